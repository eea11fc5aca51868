"""Policy glue: a model spec + a profile -> the placement Plan and the backend that executes it.

Sizes come from a skeleton on the meta device (no weights read), so `edge-runtime plan` and the
runtime's loader see the same plan.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_runtime.policy.planner import CostModel, Plan, compute_budget, describe_model, plan
from edge_runtime.policy.planner.configs import CODEC_ACTIVATION_COPIES

PIPER_FRAMES_PER_PHONEME = 7  # 86 frames/s at 22.05 kHz over ~12 phonemes/s of read speech


def planning_dtype(profile: Any) -> tuple[torch.dtype, str]:
    """The dtype the plan assumes: fp32 for the cpu tier, else the policy's choice on the GPU we
    have, or on an Ampere-class card (bf16) when planning for a tier on a machine without one."""
    from edge_runtime.policy.dtypes import choose_dtype, torch_dtype

    if not profile.memory.vram_gib:
        return torch.float32, "fp32 (cpu tier)"
    cc = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (8, 0)
    choice = choose_dtype(profile.precision.dtype, "cuda", cc)
    return torch_dtype(choice.dtype), f"{choice.dtype} ({choice.reason}; compute capability {cc[0]}.{cc[1]})"


def model_layout(spec: Any, dtype: torch.dtype, fp32_components=()):
    """The layout of a resolved model spec, measured on a meta skeleton."""
    from accelerate import init_empty_weights

    if spec.kind == "hf":
        from edge_runtime.models.hf.base import adapter_class, read_config

        config = read_config(spec.path)
        return adapter_class(config).layout(config, dtype, fp32_components)
    from edge_runtime.models.piper.vits import PiperVits
    from edge_runtime.models.piper.weights_cache import cached_weights
    from edge_runtime.models.piper.adapter import PiperModel

    _, _, hp = cached_weights(spec.path, spec.config_path)
    with init_empty_weights(include_buffers=False):
        skeleton = PiperVits(hp)
    layout = describe_model(skeleton, PiperModel.components_of(skeleton), autoregressive=(), dtype=dtype,
                            fp32_components=fp32_components)
    # Tokens are phonemes, but the HiFi-GAN decoder's peak is per output sample: ~3 tensors of
    # (last-stage channels x samples), at ~7 latent frames per phoneme of read speech.
    last_channels = hp.upsample_initial_channel // 2 ** len(hp.upsample_rates)
    width = CODEC_ACTIVATION_COPIES * PIPER_FRAMES_PER_PHONEME * hp.hop_length * last_channels
    return layout.replace_component("decoder", activation_width=width)


def plan_model(spec: Any, profile: Any, dtype: torch.dtype | None = None,
               cost_model: CostModel | None = None) -> Plan:
    """Place ``spec`` under ``profile`` (planner.plan raises PlanError when nothing fits). The cost
    model defaults to the saved `doctor --bandwidth` measurement, else the FACTS figures."""
    dtype = dtype or planning_dtype(profile)[0]
    if cost_model is None:
        from edge_runtime.policy.bandwidth import cost_model_from_measurement

        cost_model = cost_model_from_measurement()[0]
    layout = model_layout(spec, dtype, tuple(profile.precision.fp32_components))
    return plan(layout, profile, compute_budget(profile, layout), cost_model)


def backend_for(profile: Any, result: Plan) -> str:
    """The backend that executes ``result``: the profile's choice, ``auto`` and ``none`` resolved."""
    from edge_runtime.runtime.backends import choose_backend

    wanted = profile.offload.backend
    if wanted == "none" or not result.offloaded or result.cpu_only:
        return "resident"
    return choose_backend(result) if wanted == "auto" else wanted
