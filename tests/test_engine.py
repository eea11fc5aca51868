"""Runtime engine with the embedded voice: inference mode, cleanup policies, precision boundary,
OOM handling (injected faults), telemetry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, RequestFailedError
from edge_runtime.runtime.memory import OOMInjector

QUIET = {"noise_scale": 0.0, "noise_w": 0.0}


@pytest.fixture(scope="module")
def rt():
    runtime = edge_runtime.load(profile="cpu")
    yield runtime
    runtime.close()


def test_every_forward_runs_under_inference_mode(rt):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(torch.is_inference_mode_enabled()))
             for m in rt.model.components().values()]
    try:
        rt.synthesize("Inference mode everywhere.")
        list(rt.stream("Streaming too. Two sentences."))
        rt.synthesize_batch(["One.", "Two."], max_batch=2)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) >= 12 and all(seen)
    assert all(not m.training for m in rt.model.components().values())
    assert not any(p.requires_grad for p in rt.model.vits.parameters())


@pytest.mark.parametrize("policy, extra, requests, expected", [
    ("per_request", (), 5, 5),
    ("every_n", ("cleanup.every_n=2",), 5, 2),
    ("off", (), 5, 0),
])
def test_cleanup_policy_counts(policy, extra, requests, expected):
    runtime = edge_runtime.load(profile="cpu", overrides=(f"cleanup.policy={policy}", *extra))
    try:
        for _ in range(requests):
            runtime.synthesize("Count me.")
        assert runtime.governor.cleanups == expected
        assert sum(t.cleaned for t in runtime.telemetry.recent()) == expected
    finally:
        runtime.close()


def test_fp32_component_boundary_is_explicit():
    """bf16 everywhere except the fragile stages: their weights and inputs stay fp32."""
    runtime = edge_runtime.load(profile="cpu", overrides=(
        "precision.dtype=bf16", "precision.fp32_components=[duration_predictor]"))
    reference = edge_runtime.load(profile="cpu")
    try:
        if runtime.dtype.dtype != "bf16":
            pytest.skip(f"this CPU cannot run bf16: {runtime.dtype.reason}")
        comps = runtime.model.components()
        assert {n: next(m.parameters()).dtype for n, m in comps.items()} == {
            "text_encoder": torch.bfloat16, "duration_predictor": torch.float32,
            "flow": torch.bfloat16, "decoder": torch.bfloat16}
        inputs = {}
        def record(name):
            def hook(module, args):
                inputs.setdefault(name, args[0].dtype)  # returns None: the inputs stay as they are
            return hook

        hooks = [m.register_forward_pre_hook(record(n)) for n, m in comps.items() if n != "text_encoder"]
        text = "Precision boundaries are explicit."
        audio, _ = runtime.synthesize(text, **QUIET)
        for h in hooks:
            h.remove()
        assert inputs == {"duration_predictor": torch.float32, "flow": torch.bfloat16, "decoder": torch.bfloat16}
        ref, _ = reference.synthesize(text, **QUIET)
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        # a bf16 text encoder may move a phoneme boundary by a frame; the speech stays the same
        assert abs(len(audio) - len(ref)) <= 0.02 * len(ref)
        loudness = np.sqrt(np.mean(audio ** 2) / np.mean(ref ** 2))
        assert 0.8 <= loudness <= 1.25, loudness
    finally:
        runtime.close()
        reference.close()


def test_oom_splits_batch_then_fails_clearly_then_recovers(rt):
    texts = ["The first request in the batch.", "The second request, a little longer."]
    alone = [rt.synthesize(t, **QUIET)[0] for t in texts]
    decoder = rt.model.components()["decoder"]
    before = rt.governor.oom_recoveries
    with OOMInjector(decoder, times=None, only_batch_above=1) as injector:
        batched = rt.synthesize_batch(texts, max_batch=2, **QUIET)
    assert injector.raised >= 1
    assert rt.governor.oom_recoveries > before
    for (audio, _), single in zip(batched, alone):
        assert np.array_equal(audio, single)  # split into single requests: the same audio

    with OOMInjector(decoder, times=None):  # nothing fits any more
        with pytest.raises(RequestFailedError, match="out of memory"):
            rt.synthesize("This one cannot fit.")
        with pytest.raises(RequestFailedError, match="out of memory"):
            rt.synthesize_batch(texts, max_batch=2)
    audio, _ = rt.synthesize("The next request works again.")
    assert len(audio) > 0
    assert rt.telemetry.last().error is None


def test_single_oom_is_retried_once(rt):
    decoder = rt.model.components()["decoder"]
    with OOMInjector(decoder, times=1) as injector:
        audio, _ = rt.synthesize("Retried after one failure.")
    assert injector.raised == 1 and len(audio) > 0


def test_telemetry_jsonl(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    runtime = edge_runtime.load(profile="cpu", telemetry=str(path))
    try:
        runtime.synthesize("First.")
        list(runtime.stream("Second, streamed."))
        with pytest.raises(InvalidInputError):
            runtime.synthesize("   ")
    finally:
        runtime.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2  # rejected input never reached the model
    for rec in lines:
        assert rec["audio_seconds"] > 0 and rec["rtf"] > 0 and rec["rss_bytes"] > 0
        assert rec["time_to_first_audio_s"] <= rec["latency_s"]
        assert rec["batch_size"] == 1 and rec["error"] is None


def test_limits_and_settings_are_checked(rt):
    with pytest.raises(InvalidInputError, match="max_text_chars"):
        rt.synthesize("x" * (rt.profile.limits.max_text_chars + 1))
    with pytest.raises(InvalidInputError, match="speed"):
        rt.synthesize("hi", speed=0.1)
    with pytest.raises(InvalidInputError, match="noise_scale"):
        rt.synthesize("hi", noise_scale=-1)
