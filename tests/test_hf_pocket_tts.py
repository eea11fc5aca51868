"""Pocket TTS through the real loading path (a tiny random model built offline): synthesis with
and without a voice prompt, the prompt encoded once, offloaded == resident under the streamer and
accelerate, bf16 with fp32 islands, bad folders and bad prompts, and the planner's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from hf_tiny_pocket_tts import build_tiny_pocket_tts
from hf_support import speech_prompt

TEXT = "Hello world. How are you today?"  # two sentences: two generate calls
SHORT = "Hello world."
# A GPU tier (sized by stream_tier) holding the codec, the activations and KV cache but only half
# of the LM, run on this machine's execution device.
STREAM_BASE = ("memory.reserve_gib=0", "batching.max_batch=1", "offload.keep_resident=[audio_tokenizer]",
               "precision.dtype=fp32", "offload.target=disk", "limits.max_text_chars=200",
               "limits.max_prompt_seconds=5")


def stream_tier(folder: Path) -> tuple[str, ...]:
    """STREAM_BASE with a VRAM size whose room for the LM is half of its weights plus two streaming
    buffers: what the codec sub-model, activations and KV cache take is read from the plan itself."""
    from edge_runtime.runtime.loader import resolve

    plan = resolve(str(folder), profile="6gb", overrides=STREAM_BASE).plan
    lm = sum(b.bytes for b in plan.blocks if not b.submodel)
    codec = sum(b.bytes for b in plan.blocks if b.submodel)
    buffers = 2 * max(b.bytes for b in plan.blocks if not b.submodel)
    vram = plan.budget.activation_bytes + plan.budget.kv_cache_bytes + codec + (lm + buffers) // 2
    return (*STREAM_BASE, f"memory.vram_gib={vram / 1024**3:.9f}")


def same_audio(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to BLAS rounding: identical weights at other addresses (a block mapped from the
    checkpoint file, another allocation order) can make tiny matmuls take another kernel path;
    measured here: 1.5e-8 in latents, 8e-7 in audio. A wrong or missing weight is far louder."""
    return a.shape == b.shape and float(np.abs(a - b).max()) < 1e-5


def check_audio(audio: np.ndarray, rate: int, rt) -> None:
    assert rate == rt.sample_rate == 24000
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_pocket_tts(tmp_path_factory.mktemp("pocket_tts") / "model")


@pytest.fixture(scope="module")
def prompt_path(tmp_path_factory) -> Path:
    return speech_prompt(tmp_path_factory.mktemp("prompt"), seconds=1.6)


@pytest.fixture(scope="module")
def rt(folder):
    runtime = edge_runtime.load(model=str(folder), profile="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def resident_audio(rt, prompt_path):
    """The references: greedy with a voice, and seeded sampling without one."""
    voice_id, _, _ = rt.prepare_voice(prompt_path)
    return {"greedy_voice": rt.synthesize(SHORT, voice=voice_id, noise_scale=0.0)[0],
            "sampled": rt.synthesize(SHORT, seed=7)[0]}


def test_synthesize_without_voice(rt):
    audio, rate = rt.synthesize(TEXT, seed=3)
    check_audio(audio, rate, rt)
    assert audio.size % 1920 == 0  # whole latent frames of the codec
    short = rt.synthesize(SHORT, seed=3)[0]
    assert np.array_equal(rt.synthesize(SHORT, seed=3)[0], short)  # the seed fixes the flow's noise
    assert not np.array_equal(rt.synthesize(SHORT, seed=4)[0], short)


def test_voice_prompt_encoded_once(rt, prompt_path, resident_audio):
    adapter = rt.model
    before = adapter.calls["encode_prompt"]
    voice_id, voice, hit = rt.prepare_voice(prompt_path)
    assert hit and adapter.calls["encode_prompt"] == before == 1  # the fixture's preparation
    latents = voice.tensors["audio_prompt_latents"]
    assert latents.device.type == "cpu" and latents.shape == (voice.extra["frames"], 8)
    assert voice.extra["frames"] >= 6  # ~0.5 s or more of prompt at 12.5 frames per second
    first, rate = rt.synthesize(SHORT, voice=voice_id, noise_scale=0.0)
    second, _ = rt.synthesize(SHORT, voice=voice_id, noise_scale=0.0)
    check_audio(first, rate, rt)
    assert adapter.calls["encode_prompt"] == 1  # synthesis reuses the stored latents
    assert np.array_equal(first, second) and np.array_equal(first, resident_audio["greedy_voice"])
    assert not np.array_equal(first[:1920 * 4], rt.synthesize(SHORT, noise_scale=0.0)[0][:1920 * 4])


@pytest.mark.parametrize("backend", ["streamer", "accelerate", "deepspeed"])
def test_offloaded_equals_resident(folder, prompt_path, resident_audio, backend, monkeypatch):
    # Every block of the Pocket TTS model is autoregressive (its codec, a sub-model, is not), and the planner
    # rightly computes AR blocks on the CPU rather than streaming them every frame. To exercise
    # streaming we tell it this CPU is very slow, so it streams decoder layers from disk instead.
    from edge_runtime.policy import bandwidth
    from edge_runtime.policy.planner import CostModel

    monkeypatch.setattr(bandwidth, "cost_model_from_measurement",
                        lambda *a, **k: (CostModel(cpu_flops=1e3), "test: a very slow CPU"))
    rt = edge_runtime.load(model=str(folder), profile="6gb",
                           overrides=(*stream_tier(folder), f"offload.backend={backend}",
                                      *(("offload.target=cpu",) if backend == "deepspeed" else ())))
    try:
        placement = rt.placement
        assert placement["backend"] == backend
        streamed = [b.name for b in rt.plan.blocks if b.placement.startswith("stream:")]
        print(f"{backend}: streams {streamed} ({placement['streamed_bytes']} bytes)")
        assert placement["streamed_bytes"] > 0 and len([n for n in streamed if ".layers." in n]) >= 2
        voice_id, _, _ = rt.prepare_voice(prompt_path)
        greedy = rt.synthesize(SHORT, voice=voice_id, noise_scale=0.0)[0]
        # ZeRO-3 keeps tensors under its persistence threshold (100k elements: all of this tiny
        # model) on the device, so it gathers nothing; the other backends read from disk
        assert rt.placement["bytes_moved"] > 0 or rt.placement.get("mode") == "zero3"
        assert same_audio(greedy, resident_audio["greedy_voice"])  # bit-identical on this machine so far
        assert same_audio(rt.synthesize(SHORT, seed=7)[0], resident_audio["sampled"])
        assert np.array_equal(rt.synthesize(SHORT, voice=voice_id, noise_scale=0.0)[0], greedy)
    finally:
        rt.close()


def bf16_runtime(folder: Path):
    """bf16 through edge_runtime.load: the dtype policy's choice where this CPU has native bf16,
    else forced (emulated: the same loader and placement)."""
    return edge_runtime.load(model=str(folder), profile="cpu", dtype="bf16")


def test_bf16_keeps_fp32_islands(folder, prompt_path):
    rt = bf16_runtime(folder)
    try:
        adapter = rt.model
        assert adapter.dtype == torch.bfloat16
        model = adapter.model
        assert all(p.dtype == torch.float32 for p in adapter.codec.parameters())  # the codec
        assert model.latent_mean.dtype == model.latent_std.dtype == torch.float32
        assert model.flow_head.timestep_embeddings[0].freqs.dtype == torch.float32
        assert model.model.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
        assert model.flow_head.layers[0].fc1.weight.dtype == torch.bfloat16
        voice_id, _, _ = rt.prepare_voice(prompt_path)
        audio, rate = rt.synthesize(SHORT, voice=voice_id, seed=1)
        check_audio(audio, rate, rt)
    finally:
        rt.close()


def test_folder_without_weights(folder, tmp_path):
    broken = tmp_path / "no_weights"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        edge_runtime.load(model=str(broken), profile="cpu")


def test_folder_without_codec(folder, tmp_path):
    broken = tmp_path / "no_codec"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "audio_tokenizer")
    with pytest.raises(ModelNotFoundError, match="audio tokenizer"):
        edge_runtime.load(model=str(broken), profile="cpu")


def test_released_checkpoint_layout(folder, rt, tmp_path):
    """Released checkpoints lack the training-only loss weighting and EMA counter that
    save_pretrained writes: they load all the same, with the same audio."""
    from safetensors.torch import load_file, save_file

    released = tmp_path / "released"
    shutil.copytree(folder, released)
    tensors = load_file(released / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith(("loss_weighting.", "latent_stats_num_updates"))}
    assert len(kept) < len(tensors)
    save_file(kept, released / "model.safetensors", metadata={"format": "pt"})
    other = edge_runtime.load(model=str(released), profile="cpu")
    try:
        assert same_audio(other.synthesize(SHORT, noise_scale=0.0)[0], rt.synthesize(SHORT, noise_scale=0.0)[0])
    finally:
        other.close()


def test_unsupported_architecture(folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["PocketTTSModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="PocketTTSModel"):
        edge_runtime.load(model=str(other), profile="cpu")


def test_bad_prompts_and_settings(rt):
    with pytest.raises(InvalidInputError, match="NaN"):
        rt.prepare_voice(np.full(24000, np.nan, dtype=np.float32), 24000)
    too_long = rt.profile.limits.max_prompt_seconds + 1
    t = np.arange(int(too_long * 24000)) / 24000
    with pytest.raises(InvalidInputError, match="max_prompt_seconds"):
        rt.prepare_voice((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 24000)
    with pytest.raises(InvalidInputError, match="speed"):
        rt.synthesize(SHORT, speed=1.5)


def test_layout_of_default_config():
    from transformers import PocketTTSConfig, PocketTTSForConditionalGeneration

    from edge_runtime.models.hf.pocket_tts import PocketTTSSpeechModel
    from edge_runtime.policy.planner.layout import gib

    layout = PocketTTSSpeechModel.model_layout(PocketTTSConfig(), torch.bfloat16)
    print(layout.summary())
    names = [c.name for c in layout.components]
    assert names[:3] == ["embeddings", "decoder", "flow_head"]
    assert all(c.autoregressive for c in layout.components)
    assert len(layout.component("decoder").blocks) == 6 + 2  # layers, final norm, EOS head
    assert layout.component("flow_head").token_cap == 1  # one position per frame
    # ~90M parameters (the released model is "100M"), ~0.17 GiB in bf16
    assert 80e6 < layout.total_params < 110e6 and 0.14 < gib(layout.total_bytes) < 0.22
    assert layout.prompt_tokens_per_s == 12.5 and layout.max_positions == 8192
