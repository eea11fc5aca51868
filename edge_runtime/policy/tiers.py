"""VRAM tier selection: the largest shipped GPU profile the card's memory holds, else cpu.

Pure: `tier_for_vram` takes plain numbers (tests); `select_tier` reads a `HardwareInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

GIB = 1024 ** 3
# (profile name, VRAM in GiB), smallest first; must match memory.vram_gib in profiles/*.yaml.
TIERS = (("6gb", 6.0), ("8gb", 8.0), ("12gb", 12.0), ("24gb", 24.0))
# A card sold as "N GB" reports a little less than N GiB (driver/ECC reservations, 5.8 for a
# "6 GB" laptop card, 7.6-8.0 for "8 GB", 23.6 for "24 GB"): accept 93% of the tier as a match.
TOLERANCE = 0.93
# Warn when other processes hold more than this much of the card (GiB).
BUSY_GIB = 1.0


@dataclass(frozen=True)
class TierChoice:
    name: str
    explanation: str  # one line, e.g. "NVIDIA RTX 3060 Laptop, 5.8 GiB usable -> 6gb"
    warning: Optional[str] = None


def tier_for_vram(vram_gib: Optional[float], gpu_name: str = "GPU",
                  free_gib: Optional[float] = None) -> TierChoice:
    """The tier for a card with `vram_gib` total memory; None or 0 means no usable GPU."""
    if not vram_gib or vram_gib <= 0:
        return TierChoice("cpu", "no CUDA GPU -> cpu")
    head = f"{gpu_name}, {vram_gib:.1f} GiB usable"
    fitting = [name for name, size in TIERS if vram_gib >= size * TOLERANCE]
    if not fitting:
        smallest = TIERS[0][0]
        return TierChoice(smallest, f"{head} -> {smallest}",
                          f"{vram_gib:.1f} GiB is below the smallest GPU tier ({TIERS[0][1]:g} GiB): "
                          f"expect heavy offload; if requests fail, use --profile cpu")
    warning = None
    if free_gib is not None and vram_gib - free_gib > BUSY_GIB:
        warning = (f"only {free_gib:.1f} of {vram_gib:.1f} GiB are free (other processes use this GPU); "
                   f"if requests run out of memory, choose a smaller tier with --profile")
    return TierChoice(fitting[-1], f"{head} -> {fitting[-1]}", warning)


def select_tier(hw: Any) -> TierChoice:
    """Tier for the probed machine (`hardware.HardwareInfo`): decided by CUDA device 0."""
    gpu = hw.gpu
    if gpu is None:
        choice = tier_for_vram(None)
        if hw.nvml_gpus:
            return TierChoice(choice.name, choice.explanation,
                              f"{', '.join(hw.nvml_gpus)} present but torch cannot use it "
                              f"(torch {hw.torch_version}, CUDA build: {hw.torch_cuda or 'none'})")
        return choice
    free = gpu.free_bytes / GIB if gpu.free_bytes is not None else None
    choice = tier_for_vram(gpu.total_bytes / GIB, gpu.name, free)
    if len(hw.gpus) > 1:
        return TierChoice(choice.name, f"{choice.explanation} (GPU 0 of {len(hw.gpus)})", choice.warning)
    return choice
