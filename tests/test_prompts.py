"""Voice prompts: decoding, validation errors, and the cache in front of prepare_voice."""

from __future__ import annotations

import io

from pathlib import Path

import numpy as np

import pytest
import soundfile as sf

import edge_runtime
from edge_runtime.errors import InvalidInputError
from edge_runtime.runtime.prompts import prepare_prompt


@pytest.fixture(scope="module")
def rt():
    runtime = edge_runtime.load(profile="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def speech(rt):
    return rt.synthesize("A reference clip of real speech for the prompt tests.", seed=3)


def _wav(audio, rate, fmt="WAV"):
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt)
    return buf.getvalue()


def test_prompt_decoded_resampled_and_trimmed(speech):
    audio, rate = speech
    padded = np.concatenate([np.zeros(rate, np.float32), audio, np.zeros(rate, np.float32)])
    stereo = np.stack([padded, padded], axis=1)
    clean = prepare_prompt(_wav(stereo, rate, "FLAC"), 16000, max_seconds=20)
    assert clean.ndim == 1
    assert abs(len(clean) / 16000 - len(audio) / rate) < 0.3  # the added silence is gone


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not audio" * 50, "not readable audio"),
    ("silent", "silent"),
    ("nan", "NaN"),
    ("long", "at most 20 s"),
    ("short", "at least"),
])
def test_bad_prompts_are_named(data, message):
    rate = 22050
    if data == "silent":
        data = _wav(np.zeros(rate * 2, np.float32), rate)
    elif data == "nan":
        data = np.full(rate, np.nan, np.float32)
    elif data == "long":
        data = _wav(np.random.default_rng(0).normal(0, 0.1, rate * 25).astype(np.float32), rate)
    elif data == "short":
        data = _wav(np.concatenate([np.zeros(rate, np.float32), np.full(rate // 10, 0.5, np.float32)]), rate)
    with pytest.raises(InvalidInputError, match=message):
        prepare_prompt(data, 16000, max_seconds=20, sample_rate=rate)


def test_same_prompt_is_prepared_once(rt, speech):
    calls = []
    original = rt.model.prepare_voice

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    rt.model.prepare_voice = counting
    try:
        audio, rate = speech
        data = _wav(audio, rate)
        rt.synthesize("First use of the prompt.", voice=data)
        assert rt.last_telemetry.voice_cache == "miss"
        rt.synthesize("Second use of the same prompt.", voice=data)
        assert rt.last_telemetry.voice_cache == "hit"
        voice_id, voice, hit = rt.prepare_voice(data)
        assert hit and len(calls) == 1
        assert voice.extra["speaker_id"] == 0 and voice.extra["similarity"] > 0.8
        rt.synthesize("By id.", voice=voice_id)
        assert rt.last_telemetry.voice_cache == "hit" and len(calls) == 1
    finally:
        rt.model.prepare_voice = original


def test_unknown_voice_id(rt):
    with pytest.raises(InvalidInputError, match="unknown voice id"):
        rt.synthesize("hi", voice="0123456789abcdef")


def test_saved_voice_survives_a_restart(tmp_path, speech):
    overrides = (f"voice_cache.library_dir={tmp_path}",)
    first = edge_runtime.load(profile="cpu", overrides=overrides)
    audio, rate = speech
    voice_id, voice, _ = first.prepare_voice(audio, rate)
    path = first.save_voice(voice_id)
    assert Path(path).is_file() and Path(path).parent == tmp_path
    first.close()
    second = edge_runtime.load(profile="cpu", overrides=overrides)  # a fresh runtime, empty cache
    try:
        second.synthesize("From the library.", voice=voice_id)
        assert second.last_telemetry.voice_cache == "library"  # read, not prepared again
        assert second.voice_cache.get(voice_id).extra == voice.extra
    finally:
        second.close()
