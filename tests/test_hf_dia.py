"""Dia through the real loading path (edge_runtime.load on a save_pretrained folder): synthesis with
and without a voice prompt, the prompt DAC-encoded once, offloaded == resident, bf16 with the codec
kept fp32, and bad folders / prompts rejected with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.runtime.voices import VoiceLibrary
from hf_tiny_dia import SAMPLE_RATE, build_tiny_dia
from hf_support import speech_prompt

TEXT = "Hi there."  # short: a random model never emits EOS, so length = the step cap
VOICE_TEXT = "Hello again."
TRANSCRIPT = "This is my voice."
# Tiny models are overhead-bound, and two threads on a busy 2-core machine spin-wait each other
# (measured 10-20x slower than one thread while other tests ran).
ONE_THREAD = ("runtime.threads=1",)
# A GPU tier the planner can only meet by streaming text-encoder layers from disk (the AR decoder
# stays resident or computes on the CPU: streaming it per token costs more than CPU compute). The
# limits shrink the planner's token budget (activations) so that tier sits above its minimum.
TINY_TIER = ("memory.vram_gib=0.008", "memory.reserve_gib=0", "batching.max_batch=1",
             "offload.keep_resident=[]", "precision.dtype=fp32", "offload.target=disk",
             "limits.max_text_chars=60", "limits.max_prompt_seconds=3", *ONE_THREAD)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_dia(tmp_path_factory.mktemp("dia") / "tiny-dia")


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> Path:
    return speech_prompt(tmp_path_factory.mktemp("prompt"))


@pytest.fixture(scope="module")
def rt(folder):
    runtime = edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def resident(rt, prompt_wav) -> dict:
    """Reference audio of the resident runtime: greedy without a voice, seeded sampling with one."""
    return {"greedy": rt.synthesize(TEXT, noise_scale=0.0)[0],
            "voice": rt.synthesize(TEXT, voice=str(prompt_wav), seed=7)[0]}


def check_audio(audio: np.ndarray, rate: int, runtime) -> None:
    assert rate == runtime.sample_rate == SAMPLE_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def test_synthesize_without_voice(rt, resident):
    assert rt.model.model.generation_config.guidance_scale == 3.0  # generation_config.json is read
    audio, rate = rt.synthesize(TEXT, seed=1)
    check_audio(audio, rate, rt)
    assert np.array_equal(rt.synthesize(TEXT, seed=1)[0], audio)  # seeded sampling is reproducible
    check_audio(resident["greedy"], rate, rt)
    assert not np.array_equal(resident["greedy"], audio)  # greedy is another path than sampling


def test_voice_prompt_encoded_once(rt, resident, prompt_wav, monkeypatch, tmp_path):
    adapter = rt.model
    before = adapter.calls["encode_prompt"]  # the resident fixture prepared the clip without transcript
    vid, voice, hit = rt.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)
    assert not hit and adapter.calls["encode_prompt"] == before + 1
    assert voice.transcript == TRANSCRIPT and voice.extra["prompt_frames"] > 1
    vid2, _, hit2 = rt.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)
    assert vid2 == vid and hit2 and adapter.calls["encode_prompt"] == before + 1

    # synthesis reuses the stored codes: the DAC encoder itself never runs again
    encodes = []
    real_encode = adapter.codec.encode
    monkeypatch.setattr(adapter.codec, "encode", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    first, rate = rt.synthesize(VOICE_TEXT, voice=vid, noise_scale=0.0)
    check_audio(first, rate, rt)
    second, _ = rt.synthesize(VOICE_TEXT, voice=vid, noise_scale=0.0)
    assert np.array_equal(first, second)
    assert adapter.calls["encode_prompt"] == before + 1 and not encodes

    # a voice saved to the library (safetensors + JSON) and loaded back synthesises the same
    library = VoiceLibrary(tmp_path)
    library.save(vid, voice)
    assert np.array_equal(rt.synthesize(VOICE_TEXT, voice=library.load(vid), noise_scale=0.0)[0], first)

    # the prompt's frames are cut off: at most the frames generated for this sentence come out
    hop = int(np.prod(adapter.codec.config.downsampling_ratios))
    unit = adapter.split_text(VOICE_TEXT)[0]
    cap = adapter.max_new_tokens(unit, voice.extra["prompt_frames"]) - max(adapter.delays)
    assert first.size <= cap * hop < (cap + voice.extra["prompt_frames"]) * hop
    # the prompt conditions the output (the same sentence greedy without a voice differs)
    assert not np.array_equal(rt.synthesize(TEXT, voice=vid, noise_scale=0.0)[0], resident["greedy"])


@pytest.mark.parametrize("backend", ["streamer", "accelerate", "deepspeed"])
def test_offloaded_equals_resident(folder, resident, prompt_wav, backend):
    off = edge_runtime.load(model=str(folder), profile="6gb",
                            overrides=(*TINY_TIER, f"offload.backend={backend}",
                                      *(("offload.target=cpu",) if backend == "deepspeed" else ()),
                                      # ZeRO-3 cannot compute on the CPU: AR layers stream too, KV on the device
                                      *(("memory.vram_gib=0.012",) if backend == "deepspeed" else ())))
    try:
        placement = off.placement
        assert placement["backend"] == backend and placement["streamed_bytes"] > 0
        streamed = [b for b in off.plan.blocks if b.placement.startswith("stream:")]
        assert len(streamed) >= 2
        # same weights, same ops on the same device: bit-identical, greedy and seeded sampling alike
        assert np.array_equal(off.synthesize(TEXT, noise_scale=0.0)[0], resident["greedy"])
        assert np.array_equal(off.synthesize(TEXT, voice=str(prompt_wav), seed=7)[0], resident["voice"])
        if backend == "streamer":
            assert off.placement["bytes_moved"] > 0
    finally:
        off.close()


def load_bf16(folder):
    """A bf16 runtime through edge_runtime.load: the dtype policy's choice where this CPU has native
    bf16, else bf16 forced (emulated: slow, but the mechanics checked here do not depend on the ISA)."""
    return edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD, dtype="bf16")


def test_bf16_keeps_codec_fp32(folder):
    runtime = load_bf16(folder)
    try:
        adapter = runtime.model
        assert {p.dtype for p in adapter.codec.parameters()} == {torch.float32}
        floating = {p.dtype for p in adapter.model.parameters() if p.is_floating_point()}
        assert floating == {torch.bfloat16}
        audio, rate = runtime.synthesize(TEXT, seed=2)
        check_audio(audio, rate, runtime)
    finally:
        runtime.close()


def test_missing_weights_and_unknown_architecture(folder, tmp_path):
    no_weights = shutil.copytree(folder, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        edge_runtime.load(model=str(no_weights), profile="cpu")
    foreign = shutil.copytree(folder, tmp_path / "foreign")
    config = json.loads((foreign / "config.json").read_text())
    config["architectures"] = ["DiaForAudioClassification"]
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="DiaForAudioClassification"):
        edge_runtime.load(model=str(foreign), profile="cpu")


def test_bad_prompts_and_settings(rt):
    with pytest.raises(InvalidInputError, match="NaN"):
        rt.prepare_voice(np.full(SAMPLE_RATE, np.nan, dtype=np.float32), sample_rate=SAMPLE_RATE)
    too_long = rt.profile.limits.max_prompt_seconds + 1
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, int(too_long * 8000)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="max_prompt_seconds"):
        rt.prepare_voice(noise, sample_rate=8000)
    with pytest.raises(InvalidInputError, match="speaking-rate"):
        rt.synthesize(TEXT, speed=1.5)


# four lengths, four step caps; greedy, this random model ends "Hi there." and "Hello again." at an EOS
# of its own and runs the other two to their caps
BATCH_TEXTS = ["Hi there.", "How are you today?", "Hello again.", "The quick brown fox."]


@pytest.mark.parametrize("with_voice", [False, True])
def test_batch_equals_one_by_one(rt, prompt_wav, monkeypatch, with_voice):
    """One generate() for the batch; with greedy decoding each unit's audio is bit-identical to the
    unit synthesised alone (padding the text batch changes no kernel result here: every row of the
    encoder, the cross-attention and the decoder is computed independently of the others, and the
    padded text positions are masked out), each cut at its own EOS or step cap."""
    adapter = rt.model
    voice, prepared = None, None
    if with_voice:
        voice, prepared, _ = rt.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)
    alone = [rt.synthesize(text, voice=voice, noise_scale=0.0)[0] for text in BATCH_TEXTS]

    generates = []
    real_generate = adapter.model.generate
    monkeypatch.setattr(adapter.model, "generate", lambda *a, **k: generates.append(1) or real_generate(*a, **k))
    batched = rt.synthesize_batch(BATCH_TEXTS, voice=voice, max_batch=len(BATCH_TEXTS), noise_scale=0.0)
    assert len(generates) == 1  # the whole batch in one generate() call
    assert "_get_logits_processor" not in vars(adapter.model)  # the per-row cap hook is removed again

    for text, single, (audio, rate) in zip(BATCH_TEXTS, alone, batched):
        check_audio(audio, rate, rt)
        assert np.array_equal(audio, single), text
    hop = int(np.prod(adapter.codec.config.downsampling_ratios))
    start = prepared.extra["prompt_frames"] if with_voice else 1
    caps = [adapter.max_new_tokens(adapter.split_text(t)[0], start) - max(adapter.delays) - 1
            for t in BATCH_TEXTS]  # frames each unit may produce alone
    frames = [audio.size // hop for audio, _ in batched]
    assert all(0 < f <= cap for f, cap in zip(frames, caps)) and len(set(frames)) == len(frames)
    if not with_voice:
        # a row shorter than the batch stops at its own cap (Dia forces its EOS there, per row: without
        # that its last frames would be generated after a frame that had no EOS, and differ)
        assert frames[1] == caps[1] < caps[3] == frames[3]
        assert frames[2] < caps[2]  # ended at its own EOS while the batch ran on


def test_batch_of_one_and_empty(rt):
    from edge_runtime.models.base import SynthesisSettings

    greedy = SynthesisSettings(noise_scale=0.0)
    assert rt.model.synthesize_batch([], greedy) == []
    (audio,) = rt.model.synthesize_batch([TEXT], greedy)
    assert np.array_equal(audio, rt.synthesize(TEXT, noise_scale=0.0)[0])
