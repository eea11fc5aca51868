"""The Piper adapter: streamed chunks equal whole-sentence decoding; controls behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.errors import InvalidInputError
import edge_runtime
from edge_runtime.models.base import SynthesisSettings

SENTENCE = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, and he trimmed "
            "the wick, polished the great lens, and watched the ships.")
QUIET = SynthesisSettings(noise_scale=0.0, noise_w=0.0)


@pytest.fixture(scope="module")
def model():
    runtime = edge_runtime.load(profile="cpu")
    yield runtime.model
    runtime.close()


def _speak(model, text, settings, stream=False):
    with torch.inference_mode():
        chunks = list(model.synthesize_unit(text, settings, stream=stream))
    return chunks, np.concatenate(chunks)


def test_components_are_named(model):
    assert list(model.components()) == ["text_encoder", "duration_predictor", "flow", "decoder"]


def test_streamed_chunks_equal_whole_decode(model):
    _, whole = _speak(model, SENTENCE, QUIET)
    chunks, streamed = _speak(model, SENTENCE, QUIET, stream=True)
    assert len(chunks) >= 3
    assert len(chunks[0]) < len(whole) / 4  # first audio is a small part of the sentence
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= 1e-4


def test_speed_changes_duration(model):
    _, normal = _speak(model, SENTENCE, QUIET)
    _, fast = _speak(model, SENTENCE, SynthesisSettings(speed=2.0, noise_scale=0.0, noise_w=0.0))
    _, slow = _speak(model, SENTENCE, SynthesisSettings(speed=0.5, noise_scale=0.0, noise_w=0.0))
    # durations are whole frames (ceil), so halving them saves a little less than half
    assert 0.45 <= len(fast) / len(normal) <= 0.65
    assert 1.6 <= len(slow) / len(normal) <= 2.1


def test_seed_makes_noise_reproducible(model):
    a = _speak(model, "Reproducible noise.", SynthesisSettings(seed=7))[1]
    b = _speak(model, "Reproducible noise.", SynthesisSettings(seed=7))[1]
    c = _speak(model, "Reproducible noise.", SynthesisSettings(seed=8))[1]
    assert np.array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_output_level_is_calibrated(model):
    _, audio = _speak(model, SENTENCE, QUIET)
    assert 0.5 <= np.abs(audio).max() <= 1.0


def test_unknown_speaker_is_rejected(model):
    with pytest.raises(InvalidInputError, match="single-speaker"):
        model.check_settings(SynthesisSettings(speaker="nobody"))
    with pytest.raises(InvalidInputError, match="out of range"):
        model.check_settings(SynthesisSettings(speaker=3))


def test_weights_are_constants(model):
    assert all(not m.training for m in model.components().values())
    assert not any(p.requires_grad for p in model.vits.parameters())


def test_fp32_component_boundary_is_explicit():
    """bf16 everywhere except the fragile stages: their weights and inputs stay fp32."""
    quiet = {"noise_scale": 0.0, "noise_w": 0.0}
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
        audio, _ = runtime.synthesize(text, **quiet)
        for h in hooks:
            h.remove()
        assert inputs == {"duration_predictor": torch.float32, "flow": torch.bfloat16, "decoder": torch.bfloat16}
        ref, _ = reference.synthesize(text, **quiet)
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        # a bf16 text encoder may move a phoneme boundary by a frame; the speech stays the same
        assert abs(len(audio) - len(ref)) <= 0.02 * len(ref)
        loudness = np.sqrt(np.mean(audio ** 2) / np.mean(ref ** 2))
        assert 0.8 <= loudness <= 1.25, loudness
    finally:
        runtime.close()
        reference.close()
