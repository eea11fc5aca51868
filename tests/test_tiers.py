"""Tier selection from VRAM size: marketing GB vs GiB, below/above the range, no GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge_runtime.policy.profiles import list_profiles, load_profile
from edge_runtime.policy.tiers import TIERS, select_tier, tier_for_vram


@pytest.mark.parametrize("vram_gib, tier, warns", [
    (4.0, "6gb", True),  # below the smallest tier: still the GPU, with a warning
    (5.8, "6gb", False),  # "6 GB" laptop card
    (6.0, "6gb", False),
    (7.6, "8gb", False),  # "8 GB" card that reports less
    (8.0, "8gb", False),
    (11.7, "12gb", False),
    (12.0, "12gb", False),
    (16.0, "12gb", False),
    (23.6, "24gb", False),
    (24.0, "24gb", False),
    (48.0, "24gb", False),
    (80.0, "24gb", False),
])
def test_tier_for_vram(vram_gib, tier, warns):
    choice = tier_for_vram(vram_gib, "NVIDIA Test GPU")
    assert choice.name == tier
    assert (choice.warning is not None) == warns
    assert choice.explanation == f"NVIDIA Test GPU, {vram_gib:.1f} GiB usable -> {tier}"


@pytest.mark.parametrize("vram_gib", [None, 0])
def test_no_gpu_is_cpu(vram_gib):
    choice = tier_for_vram(vram_gib)
    assert choice.name == "cpu" and choice.warning is None and "cpu" in choice.explanation


def test_busy_gpu_warns_but_keeps_tier():
    choice = tier_for_vram(8.0, free_gib=5.0)
    assert choice.name == "8gb"
    assert "5.0 of 8.0 GiB" in choice.warning


def _hw(gpus, nvml_gpus=()):
    return SimpleNamespace(gpus=gpus, gpu=gpus[0] if gpus else None, nvml_gpus=list(nvml_gpus),
                           torch_version="2.13.0+cpu", torch_cuda=None)


def test_select_tier_from_probe_result():
    gpu = SimpleNamespace(name="NVIDIA GeForce RTX 3060 Laptop GPU", total_bytes=int(5.8 * 1024 ** 3),
                          free_bytes=int(5.6 * 1024 ** 3))
    choice = select_tier(_hw([gpu]))
    assert choice.name == "6gb"
    assert choice.explanation == "NVIDIA GeForce RTX 3060 Laptop GPU, 5.8 GiB usable -> 6gb"
    assert "GPU 0 of 2" in select_tier(_hw([gpu, gpu])).explanation


def test_select_tier_without_cuda():
    assert select_tier(_hw([])).name == "cpu"
    # The driver sees a GPU that torch cannot use (CPU build): say so.
    choice = select_tier(_hw([], nvml_gpus=["NVIDIA RTX 4060"]))
    assert choice.name == "cpu" and "NVIDIA RTX 4060" in choice.warning


def test_tiers_match_shipped_profiles():
    for name, vram in TIERS:
        assert load_profile(name, env={}).memory.vram_gib == vram
    assert {name for name, _ in TIERS} | {"cpu"} == set(list_profiles())
