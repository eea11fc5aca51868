"""Runtime engine wiring on a small stub model (the embedded voice keeps its own tests): inference
mode, cleanup policies counted per forward, OOM handling (injected faults), telemetry, validation.
The engine sees the model only through the family protocol, so these paths are the real voice's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.errors import InvalidInputError, RequestFailedError
from edge_runtime.models.base import SpeechModel
from edge_runtime.policy.profiles import load_profile
from edge_runtime.runtime.engine import Runtime
from edge_runtime.runtime.memory import OOMInjector

RATE = 8000


class StubModel(SpeechModel):
    """Text -> a tone per sentence: an encoder and a decoder module, batched for real."""

    family = "stub"
    supports_batch = True
    model_id = "stub"
    sample_rate = RATE

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.encoder, self.decoder = nn.Linear(4, 8).eval(), nn.Linear(8, 80).eval()
        self.forwards = 0  # synthesize_unit / synthesize_batch calls

    @classmethod
    def layout(cls, source, dtype, fp32_components=()):  # never planned here
        raise NotImplementedError

    @classmethod
    def load(cls, source, placer):
        return cls()

    def components(self):
        return {"encoder": self.encoder, "decoder": self.decoder}

    def split_text(self, text: str) -> list[str]:
        return [s.strip() + "." for s in text.split(".") if s.strip()]

    def _audio(self, units: list[str]) -> list[np.ndarray]:
        features = torch.tensor([[len(u), u.count(" "), ord(u[0]) / 100, 1.0] for u in units])
        frames = self.decoder(torch.tanh(self.encoder(features)))  # (batch, 80 samples per frame)
        return [np.tile(torch.tanh(row).numpy(), len(u)).astype(np.float32) for row, u in zip(frames, units)]

    def synthesize_unit(self, unit, settings, voice=None, stream=False):
        self.forwards += 1
        yield self._audio([unit])[0]

    def synthesize_batch(self, units, settings, voice=None):
        self.forwards += 1
        return self._audio(units)


def runtime(*overrides: str, telemetry: str | None = None) -> Runtime:
    return Runtime(StubModel(), load_profile("cpu", ("runtime.threads=1", *overrides)), telemetry_path=telemetry)


@pytest.fixture
def rt():
    runtime_ = runtime()
    yield runtime_
    runtime_.close()


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
    assert len(seen) == 2 * (1 + 2 + 1) and all(seen)


@pytest.mark.parametrize("policy, extra, requests, expected", [
    ("per_request", (), 5, 5),
    ("every_n", ("cleanup.every_n=2",), 5, 2),
    ("off", (), 5, 0),
])
def test_cleanup_policy_counts(policy, extra, requests, expected):
    rt_ = runtime(f"cleanup.policy={policy}", *extra)
    try:
        for _ in range(requests):
            rt_.synthesize("Count me.")
        assert rt_.governor.cleanups == expected
        assert sum(t.cleaned for t in rt_.telemetry.recent()) == expected
    finally:
        rt_.close()


@pytest.mark.parametrize("policy, extra, expected", [("per_request", (), 2), ("every_n", ("cleanup.every_n=2",), 1)])
def test_a_batch_cleans_once_per_forward(policy, extra, expected):
    """Six one-sentence requests at max_batch 3 are two forwards: `per_request` cleans twice, not six
    times, and `every_n` counts those two forwards, not six requests; every request is recorded."""
    rt_ = runtime(f"cleanup.policy={policy}", *extra)
    try:
        out = rt_.synthesize_batch([f"Request number {i}." for i in range(6)], max_batch=3)
        assert len(out) == 6 and all(len(audio) for audio, _ in out)
        assert rt_.model.forwards == 2
        assert rt_.governor.requests == 2 and rt_.governor.cleanups == expected
        records = rt_.telemetry.recent()
        assert len(records) == 6 and {r.batch_size for r in records} == {3}
    finally:
        rt_.close()


def test_batch_equals_one_by_one(rt):
    texts = ["Short one.", "A longer request. With two sentences."]
    alone = [rt.synthesize(t)[0] for t in texts]
    for (audio, rate), single in zip(rt.synthesize_batch(texts, max_batch=3), alone):
        assert rate == RATE and np.allclose(audio, single, atol=1e-6)  # batched matmuls round differently


def test_oom_splits_batch_then_fails_clearly_then_recovers(rt):
    texts = ["The first request in the batch.", "The second request, a little longer."]
    alone = [rt.synthesize(t)[0] for t in texts]
    decoder = rt.model.components()["decoder"]
    before = rt.governor.oom_recoveries
    with OOMInjector(decoder, times=None, only_batch_above=1) as injector:
        batched = rt.synthesize_batch(texts, max_batch=2)
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
    rt_ = runtime(telemetry=str(path))
    try:
        rt_.synthesize("First.")
        list(rt_.stream("Second, streamed."))
        with pytest.raises(InvalidInputError):
            rt_.synthesize("   ")
    finally:
        rt_.close()
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


def test_optional_capabilities_have_defaults(rt):
    """What a family does not do is a clear error from the protocol's defaults, never an AttributeError."""
    with pytest.raises(InvalidInputError, match="does not take voice prompts"):
        rt.prepare_voice(np.zeros(RATE, np.float32), RATE)
    assert rt.placement == {"backend": "resident", "device": "cpu"}
    assert rt.model.describe()["family"] == "stub"
