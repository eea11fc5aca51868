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
