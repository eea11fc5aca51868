"""VibeVoice's diffusion settings from generation_config.json, and its noise scheduler.

The published generation_config.json names the scheduler (``noise_scheduler_class``,
``noise_scheduler_config``: DPMSolverMultistepScheduler with squaredcos_cap_v2 / v_prediction) and
may set ``num_diffusion_steps``; transformers' GenerationConfig drops keys it does not know when it
loads the file, so they are read here. The scheduler comes from diffusers (the ``vibevoice`` extra),
the library transformers itself builds it from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ModelNotFoundError

DEFAULT_CLASS = "DPMSolverMultistepScheduler"
DEFAULT_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
DEFAULT_STEPS = 10  # VibeVoiceGenerationMixin's default


@dataclass(frozen=True)
class DiffusionSettings:
    scheduler_class: str = DEFAULT_CLASS
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG))
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 1.0


def read_settings(folder: Path) -> DiffusionSettings:
    path = Path(folder) / "generation_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc}") from None
    steps = saved.get("num_diffusion_steps") or saved.get("n_diffusion_steps") or DEFAULT_STEPS
    return DiffusionSettings(scheduler_class=str(saved.get("noise_scheduler_class") or DEFAULT_CLASS),
                             scheduler_config=dict(saved.get("noise_scheduler_config") or DEFAULT_CONFIG),
                             steps=int(steps), guidance_scale=float(saved.get("guidance_scale") or 1.0))


def build_scheduler(settings: DiffusionSettings):
    """The diffusers scheduler the settings name; a clear error when diffusers is missing."""
    try:
        import diffusers
    except ImportError:
        raise ModelNotFoundError(
            f"VibeVoice samples its acoustic latents with diffusers' {settings.scheduler_class}, and diffusers is "
            "not installed: pip install 'edge-runtime[vibevoice]' (diffusers==0.42.1)") from None
    scheduler_class = getattr(diffusers, settings.scheduler_class, None)
    if scheduler_class is None or not all(hasattr(scheduler_class, a) for a in ("set_timesteps", "step")):
        raise ModelNotFoundError(f"generation_config.json names noise_scheduler_class {settings.scheduler_class!r}, "
                                 "which is not a diffusers scheduler")
    return scheduler_class(**settings.scheduler_config)
