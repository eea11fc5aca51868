"""Precision policy: the profile's `precision.dtype` resolved against the hardware.

auto: bf16 on compute capability >= 8.0 (native bf16, fp32 range), fp16 on 7.x (tensor cores,
but overflow-prone: see precision.fp32_components), fp32 below 7.0 (no fast half math).
CPU: fp32 unless asked; an explicit bf16 needs native bf16 (avx512_bf16/amx_bf16), since
emulated bf16 is slower than fp32 and even native bf16 convolutions measured slower here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

DTYPES = ("bf16", "fp16", "fp32")
_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
            "fp32": "fp32", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # bf16 | fp16 | fp32
    reason: str
    fell_back: bool = False  # True when an explicit request could not be honoured


def _cuda(requested: str, cc: Optional[tuple[int, int]]) -> DtypeChoice:
    if cc is None:
        return DtypeChoice("fp32", "compute capability unknown: fp32 is safe", requested != "fp32")
    ccs = f"{cc[0]}.{cc[1]}"
    if requested == "auto":
        if cc >= (8, 0):
            return DtypeChoice("bf16", f"auto: compute capability {ccs} has native bf16")
        if cc >= (7, 0):
            return DtypeChoice("fp16", f"auto: compute capability {ccs} has fp16 tensor cores, no bf16")
        return DtypeChoice("fp32", f"auto: compute capability {ccs} has no fast half precision")
    if requested == "bf16" and cc < (8, 0):
        fallback = "fp16" if cc >= (7, 0) else "fp32"
        return DtypeChoice(fallback, f"bf16 needs compute capability >= 8.0, this GPU is {ccs}: "
                                     f"using {fallback}", True)
    if requested == "fp16" and cc < (5, 3):
        return DtypeChoice("fp32", f"fp16 needs compute capability >= 5.3, this GPU is {ccs}: using fp32", True)
    return DtypeChoice(requested, f"{requested} as the profile asks (compute capability {ccs})")


def _cpu(requested: str, cpu_bf16: bool) -> DtypeChoice:
    if requested == "auto":
        return DtypeChoice("fp32", "auto on CPU: fp32 (half-precision convolutions measured slower)")
    if requested == "fp32":
        return DtypeChoice("fp32", "fp32 as the profile asks")
    if requested == "bf16" and not cpu_bf16:
        return DtypeChoice("fp32", "bf16 asked but this CPU has no native bf16 (avx512_bf16/amx_bf16): "
                                   "using fp32", True)
    return DtypeChoice(requested, f"{requested} on CPU as the profile asks")


def choose_dtype(requested: str, device_type: str, compute_capability: Optional[tuple[int, int]] = None,
                 cpu_bf16: bool = False) -> DtypeChoice:
    """The dtype to run in and why. `device_type` is "cuda" or "cpu" (others are treated as cpu)."""
    name = "auto" if requested == "auto" else _ALIASES.get(str(requested).lower())
    if name is None:
        raise ValueError(f"unknown dtype {requested!r}; allowed: auto, {', '.join(DTYPES)}")
    if device_type == "cuda":
        return _cuda(name, tuple(compute_capability) if compute_capability else None)
    return _cpu(name, cpu_bf16)


def dtype_name(name: str) -> str:
    """"bf16", "fp16" or "fp32" for any alias (bfloat16, half, float32, ...)."""
    found = _ALIASES.get(str(name).strip().lower())
    if found is None:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return found


def resolve_dtype(requested: str, device_type: str, compute_capability: Optional[tuple[int, int]] = None,
                  cpu_bf16: bool = False) -> str:
    """Just the name: "bf16", "fp16" or "fp32". See `choose_dtype` for the reason."""
    return choose_dtype(requested, device_type, compute_capability, cpu_bf16).dtype


def torch_dtype(name: str) -> Any:
    """"bf16"/"fp16"/"fp32" (or torch-style aliases) -> torch.dtype; imports torch lazily."""
    import torch

    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[key]


def choose_device(profile: Any) -> tuple[str, DtypeChoice]:
    """CUDA when the profile is a GPU tier and torch sees a GPU, else the CPU; and the dtype policy's
    choice for that device (a DtypeChoice with the reason)."""
    import torch

    requested = profile.precision.dtype
    if profile.memory.vram_gib and torch.cuda.is_available():
        return "cuda", choose_dtype(requested, "cuda", torch.cuda.get_device_capability(0))
    cpu_bf16 = False
    if requested == "bf16":  # only then is the CPU's ISA worth probing
        from edge_runtime.policy.hardware import probe

        cpu_bf16 = probe().cpu.bf16_native
    return "cpu", choose_dtype(requested, "cpu", cpu_bf16=cpu_bf16)


def planning_dtype(profile: Any) -> tuple[Any, str]:
    """The dtype a plan for the profile's tier assumes, whatever this machine has: fp32 for the cpu
    tier, else the policy's choice on the GPU we have, or on an Ampere-class card (bf16) when
    planning for a tier on a machine without one."""
    import torch

    if not profile.memory.vram_gib:
        return torch.float32, "fp32 (cpu tier)"
    cc = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (8, 0)
    choice = choose_dtype(profile.precision.dtype, "cuda", cc)
    return torch_dtype(choice.dtype), f"{choice.dtype} ({choice.reason}; compute capability {cc[0]}.{cc[1]})"
