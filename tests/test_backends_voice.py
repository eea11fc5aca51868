"""The embedded voice under every backend: flow and decoder streamed from disk (or offloaded by
ZeRO-3), the rest resident, and the same audio as the resident runtime (noise scales 0)."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.policy.planner import PlanError

TEXT = "The quick brown fox jumps over the lazy dog. Then it rests, twice!"
# A GPU tier small enough that the planner must offload the text encoder, flow and decoder, run on this machine's execution device (the CPU here, CUDA where there is one).
TINY_TIER = ("memory.vram_gib=0.25", "memory.reserve_gib=0", "batching.max_batch=1",
             "offload.keep_resident=[]", "precision.dtype=fp32")


def synth(rt):
    audio, rate = rt.synthesize(TEXT, noise_scale=0.0, noise_w=0.0)
    return audio


@pytest.fixture(scope="module")
def resident_audio():
    rt = edge_runtime.load(profile="cpu")
    try:
        return synth(rt)
    finally:
        rt.close()


@pytest.mark.parametrize("backend,target", [("accelerate", "disk"), ("streamer", "disk"),
                                            ("streamer", "cpu"), ("deepspeed", "cpu")])
def test_voice_same_audio_under_backend(backend, target, resident_audio):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    rt = edge_runtime.load(profile="6gb", overrides=(*TINY_TIER, f"offload.target={target}",
                                                     f"offload.backend={backend}"))
    try:
        placement = rt.placement
        assert placement["backend"] == backend
        assert placement["streamed_bytes"] > 50e6  # encoder, flow and decoder: most of the voice
        audio = synth(rt)
        assert len(audio) == len(resident_audio)
        # the eager modules vs the resident runtime's fast paths: float rounding only
        assert np.abs(audio - resident_audio).max() < 1e-4
        if target == "disk" or backend == "deepspeed":
            assert rt.placement["bytes_moved"] > 0
        # a second request after the first: the streamer has learned the order; same audio
        assert np.array_equal(synth(rt), audio)
    finally:
        rt.close()


def test_budget_below_minimum_names_it():
    with pytest.raises(PlanError, match=r"below the minimum of 0\.\d\d GiB .* largest block 'flow'"):
        edge_runtime.load(profile="6gb", overrides=("memory.vram_gib=0.05", "memory.reserve_gib=0",
                                                    "offload.keep_resident=[]"))
    with pytest.raises(PlanError, match=r"keep_resident \['text_encoder'\] .* does not fit"):
        edge_runtime.load(profile="6gb", overrides=("memory.vram_gib=0.23", "memory.reserve_gib=0",
                                                    "batching.max_batch=1"))


def test_cli_say_under_streamer(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "s.wav"
    res = subprocess.run([sys.executable, "-m", "edge_runtime", "say", "--profile", "6gb",
                          *[a for kv in TINY_TIER for a in ("--set", kv)], "--set", "offload.target=disk",
                          "Streamed from disk.", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 10_000
    # a budget below the minimum: exit 2, one line naming the minimum, no traceback
    res = subprocess.run([sys.executable, "-m", "edge_runtime", "say", "--profile", "6gb", "--set",
                          "memory.vram_gib=0.05", "--set", "memory.reserve_gib=0", "--set",
                          "offload.keep_resident=[]", "Hi.", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "below the minimum" in res.stderr and "Traceback" not in res.stderr
