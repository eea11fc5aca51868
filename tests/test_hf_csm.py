"""Sesame CSM through the real loading path (config + model.safetensors + processor files in a
folder), on a tiny random model: synthesis with and without a cloned voice, the voice prompt
encoded once, offloaded blocks giving the resident audio, bf16 with the codec in fp32, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from hf_tiny_csm import build_tiny_csm
from hf_support import speech_prompt

TEXT = "Hi there."
PROMPT_TEXT = "Front center."
# Tiny models are overhead-bound: one thread is as fast and steadier on a shared 2-core machine.
THREADS = ("runtime.threads=1",)
# A GPU tier so small that the planner streams the codec's parts from disk (AR blocks go to the
# CPU, cheaper than streaming them per frame); the text and prompt limits shrink the activation
# budget, which would otherwise dwarf this tiny model's weights.
TINY_TIER = ("memory.vram_gib=0.009", "memory.reserve_gib=0", "batching.max_batch=1",
             "offload.keep_resident=[]", "precision.dtype=fp32", "offload.target=disk",
             "limits.max_text_chars=40", "limits.max_prompt_seconds=3", *THREADS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_csm(tmp_path_factory.mktemp("csm") / "tiny-csm")


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> Path:
    return speech_prompt(tmp_path_factory.mktemp("prompt"), rate=24000)


@pytest.fixture(scope="module")
def rt(folder):
    runtime = edge_runtime.load(model=str(folder), profile="cpu", overrides=THREADS)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def reference(rt, prompt):
    """Resident audio: greedy without a voice, seeded sampling with the cloned voice."""
    voice_id, _, _ = rt.prepare_voice(prompt, transcript=PROMPT_TEXT)
    return rt.synthesize(TEXT, noise_scale=0.0)[0], rt.synthesize(TEXT, voice=voice_id, seed=7)[0]


def check_audio(audio: np.ndarray, rt) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert rt.sample_rate == 24000  # Mimi's rate, from the codec config


def test_synthesize_with_and_without_voice(rt, prompt, reference):
    plain, cloned = reference
    check_audio(plain, rt)
    check_audio(cloned, rt)
    samples_per_frame = rt.sample_rate / rt.model.frame_rate  # 1920 at 12.5 Hz
    assert len(plain) == samples_per_frame * rt.model.max_new_tokens(TEXT, 0)  # no eos: random
    # greedy is reproducible; a seed makes sampling reproducible, and the voice changes the audio
    assert np.array_equal(rt.synthesize(TEXT, noise_scale=0.0)[0], plain)
    voice_id, _, _ = rt.prepare_voice(prompt, transcript=PROMPT_TEXT)
    assert np.array_equal(rt.synthesize(TEXT, voice=voice_id, seed=7)[0], cloned)
    assert not np.array_equal(rt.synthesize(TEXT, voice=voice_id, noise_scale=0.0)[0], plain)
    # generation_config.json's sampling, the depth decoder's (depth_decoder_* keys) included
    assert rt.model.sampling["depth_decoder_"] == {**rt.model.sampling[""], "temperature": 0.9, "top_k": 50}
    with pytest.raises(InvalidInputError, match="speaking-rate"):
        rt.synthesize(TEXT, speed=1.5)


def test_voice_prompt_encoded_once(folder, prompt):
    rt = edge_runtime.load(model=str(folder), profile="cpu", overrides=THREADS)
    try:
        calls = rt.model.calls
        voice_id, voice, hit = rt.prepare_voice(prompt)
        assert not hit and calls["encode_prompt"] == 1
        assert voice.tensors["codes"].shape[1] == 4 and voice.transcript == ""  # (frames, codebooks)
        again, cached, hit = rt.prepare_voice(prompt)
        assert hit and again == voice_id and cached is voice and calls["encode_prompt"] == 1
        for _ in range(2):
            check_audio(rt.synthesize(TEXT, voice=voice_id, noise_scale=0.0)[0], rt)
        assert calls["encode_prompt"] == 1
    finally:
        rt.close()


def test_cached_codes_match_transformers_own_context_path(rt, folder, prompt):
    """The prompt built from cached codes gives the frames transformers' processor + generate()
    give when they encode the reference audio themselves."""
    from transformers import AutoProcessor, CsmForConditionalGeneration

    from edge_runtime.runtime.prompts import prepare_prompt

    clean = prepare_prompt(prompt, 24000, 20.0)
    voice = rt.model.prepare_voice(clean, 24000, PROMPT_TEXT)
    processor = AutoProcessor.from_pretrained(folder)
    model = CsmForConditionalGeneration.from_pretrained(folder).eval()
    conversation = [{"role": "0", "content": [{"type": "text", "text": PROMPT_TEXT},
                                              {"type": "audio", "audio": clean}]},
                    {"role": "0", "content": [{"type": "text", "text": TEXT}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    greedy = dict(max_new_tokens=6, do_sample=False, depth_decoder_do_sample=False)
    with torch.inference_mode():
        expected = model.generate(**inputs, **greedy)
        embeds = rt.model.prompt_embeds(TEXT, voice)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        got = rt.model.model.generate(inputs_embeds=embeds, attention_mask=mask, **greedy)
    assert embeds.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["streamer", "accelerate", "deepspeed"])
def test_offloaded_equals_resident(folder, prompt, reference, backend):
    rt = edge_runtime.load(model=str(folder), profile="6gb",
                           overrides=(*TINY_TIER, f"offload.backend={backend}",
                                      *(("offload.target=cpu",) if backend == "deepspeed" else ())))
    try:
        placement = rt.placement
        assert placement["backend"] == backend
        blocks = rt.plan.blocks
        codec = sum(b.bytes for b in blocks if b.name.startswith("codec_model."))
        assert placement["streamed_bytes"] > 0.9 * codec  # nearly all of the codec, in parts
        assert sum(b.placement.startswith("stream:") for b in blocks) >= 10
        voice_id, _, _ = rt.prepare_voice(prompt, transcript=PROMPT_TEXT)
        plain, cloned = reference
        # same weights, same kernels, blocks only fetched from disk: bit-identical audio
        assert np.array_equal(rt.synthesize(TEXT, noise_scale=0.0)[0], plain)
        assert np.array_equal(rt.synthesize(TEXT, voice=voice_id, seed=7)[0], cloned)
        # ZeRO-3 keeps tensors under its persistence threshold (100k elements: all of this tiny
        # model) on the device, so it gathers nothing; the other backends read from disk
        assert rt.placement["bytes_moved"] > 0 or rt.placement.get("mode") == "zero3"
        assert np.array_equal(rt.synthesize(TEXT, noise_scale=0.0)[0], plain)  # a learned order
    finally:
        rt.close()


def test_bf16_keeps_codec_fp32(folder, prompt):
    # the policy's bf16 where this CPU has it natively, else forced (emulated; same loader)
    rt = edge_runtime.load(model=str(folder), profile="cpu", overrides=THREADS, dtype="bf16")
    try:
        params = dict(rt.model.model.named_parameters())
        assert {p.dtype for n, p in params.items() if n.startswith("codec_model.")} == {torch.float32}
        assert {p.dtype for n, p in params.items() if not n.startswith("codec_model.")} == {torch.bfloat16}
        voice_id, _, _ = rt.prepare_voice(prompt)
        check_audio(rt.synthesize(TEXT, voice=voice_id, seed=1)[0], rt)
    finally:
        rt.close()


def test_bad_model_folders(folder, tmp_path):
    import json

    broken = tmp_path / "no-weights"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        edge_runtime.load(model=str(broken), profile="cpu")
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architectures": ["CsmBackboneModel"]}))
    with pytest.raises(InvalidInputError, match="CsmBackboneModel"):
        edge_runtime.load(model=str(foreign), profile="cpu")


def test_bad_prompts(rt):
    with pytest.raises(InvalidInputError, match="NaN"):
        rt.prepare_voice(np.full(24000, np.nan, dtype=np.float32), sample_rate=24000)
    long = np.sin(np.arange(24000 * 25) / 10).astype(np.float32)  # 25 s > the cpu profile's 20 s
    with pytest.raises(InvalidInputError, match="max_prompt_seconds"):
        rt.prepare_voice(long, sample_rate=24000)
