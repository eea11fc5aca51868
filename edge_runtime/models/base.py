"""The protocol every model adapter follows, so the engine and planner never see model details."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SynthesisSettings:
    """Per-request controls; None means the model's own default."""

    speed: float = 1.0  # > 1 speaks faster (length scale = 1 / speed)
    noise_scale: float | None = None  # variation of the acoustic latent
    noise_w: float | None = None  # variation of phoneme durations
    speaker: str | int | None = None  # multi-speaker models: name or index
    seed: int | None = None  # fixes the noise for reproducible audio


class SpeechModel(ABC):
    """A loaded text-to-speech model, split into named components the planner can place."""

    model_id: str
    sample_rate: int
    supports_voice_prompt: bool = False

    @abstractmethod
    def components(self) -> dict[str, Any]:
        """Name -> torch.nn.Module, in execution order (e.g. text_encoder ... decoder)."""

    @abstractmethod
    def split_text(self, text: str) -> list[str]:
        """Units synthesised one after another (sentences); also the streaming granularity."""

    @abstractmethod
    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        """Audio for one unit (float32 mono); with `stream`, in chunks as soon as each is ready."""

    def check_settings(self, settings: SynthesisSettings) -> None:
        """Raise InvalidInputError for settings this model cannot honour."""

    def speakers(self) -> list[str]:
        return []

    def describe(self) -> dict[str, Any]:
        """Facts for `voices`, `doctor` and the server's model list."""
        return {"id": self.model_id, "sample_rate": self.sample_rate,
                "voice_prompt": self.supports_voice_prompt, "speakers": self.speakers()}
