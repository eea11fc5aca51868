"""VibeVoice through the real loading path (edge_runtime.load on a tiny random folder saved SHARDED): the
layout (per-frame blocks, the once-per-voice acoustic encoder kept fp32, the LM layers the only quantizable
blocks), the published shapes planned from configs alone, synthesis with and without a voice, the voice
encoded once and its cached latents equal to transformers' raw-audio path, the third LM pass removed
(passes counted per frame, outputs equal to transformers' own generate(), and the one case where they may
differ), streaming and batching, every backend (and the quantized paths) equal to resident, bf16 with the
fp32 parts fp32, the CLI and the server, and bad folders / prompts rejected with clear errors."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.runtime.voices import VoiceLibrary
from edge_runtime.serving.cli import main
from hf_support import check_missing_shard_is_named, quantized_cache, speech_prompt  # noqa: F401 (an autouse fixture)
from hf_tiny_vibevoice import AUDIO, AUDIO_BOS, AUDIO_EOS, EOS, HOP, SAMPLE_RATE, build_tiny_vibevoice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import vibevoice_configs  # noqa: E402

TEXT = "Hi."  # short: the tiny model speaks until its frame cap (hf_tiny_vibevoice.speaking)
VOICE_TEXT = "Hello again."
# Tiny models are overhead-bound; two threads on a busy 2-core machine spin-wait each other.
ONE_THREAD = ("runtime.threads=1",)
# A GPU tier the tiny model fits only by streaming (from disk) parts of the once-per-voice acoustic
# encoder, every per-frame block resident. No quantization: the planner would otherwise compress LM
# layers before streaming (outputs differ).
TIER = ("memory.reserve_gib=0", "batching.max_batch=1", "offload.keep_resident=[]", "precision.dtype=fp32",
        "offload.target=disk", "limits.max_text_chars=60", "limits.max_prompt_seconds=3",
        "quantization.allowed=[]", *ONE_THREAD)
TIER_VRAM = "memory.vram_gib=0.014"
# diffusers 0.42's DPM-Solver builds its sigmas with np.array(tensor, copy=False) on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_vibevoice(tmp_path_factory.mktemp("vibevoice") / "tiny-vibevoice")


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> Path:
    return speech_prompt(tmp_path_factory.mktemp("prompt"))


@pytest.fixture(scope="module")
def clip(prompt_wav) -> np.ndarray:
    """The prompt as 24 kHz float32 samples (what the model's prepare_voice receives)."""
    from edge_runtime.dsp import resample

    audio, rate = sf.read(prompt_wav, dtype="float32", always_2d=True)
    return resample(audio[: rate * 2, 0], rate, SAMPLE_RATE).astype(np.float32)


@pytest.fixture(scope="module")
def rt(folder):
    runtime = edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def resident(rt, prompt_wav) -> dict:
    """Reference audio of the resident runtime (seeded: the diffusion noise is VibeVoice's randomness)."""
    voice, _, _ = rt.prepare_voice(str(prompt_wav))
    return {"plain": rt.synthesize(TEXT, seed=1)[0], "voice_id": voice,
            "voice": rt.synthesize(TEXT, voice=voice, seed=7)[0]}


@pytest.fixture(scope="module")
def stock(folder, rt):
    """transformers' own model class and processor (from_pretrained), holding the very tensors the
    runtime loaded: CPU GEMMs round differently at different weight alignments (measured: a Linear over
    an mmap'd, unaligned copy of the same weights differs in the last bit), so bit-for-bit comparisons
    of the code paths need the same storage."""
    from transformers import AutoProcessor, VibeVoiceForConditionalGeneration

    model = VibeVoiceForConditionalGeneration.from_pretrained(folder).eval()
    model.load_state_dict(rt.model.model.state_dict(), assign=True)
    model.tie_weights()
    return model, AutoProcessor.from_pretrained(folder)


def check_audio(audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    assert rate == SAMPLE_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def frames_of(adapter, text: str, voice=None) -> int:
    """The frame cap of one sentence: the tiny model speaks until it."""
    return adapter.max_new_tokens(text, adapter._prompt([text], voice).length)


def lm_passes(model) -> tuple[list, object]:
    """A counter of Qwen2 forward passes (the LM's, whoever calls it) and its hook handle."""
    calls: list = []
    handle = model.model.language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def stock_inputs(processor, text: str, clip: np.ndarray):
    conversation = [{"role": "0", "content": [{"type": "text", "text": text}, {"type": "audio", "audio": clip}]}]
    return processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"sampling_rate": SAMPLE_RATE})


class Force:
    """Forces ``frames`` diffusion tokens, then audio eos and eos (a random LM never emits them)."""

    def __init__(self, frames: int, ids: dict) -> None:
        self.plan = [ids[AUDIO]] * frames + [ids[AUDIO_EOS], ids[EOS]]
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.plan[min(self.step, len(self.plan) - 1)]] = 0.0
        self.step += 1
        return forced


def token_ids(processor) -> dict:
    return {t: processor.tokenizer.convert_tokens_to_ids(t) for t in (AUDIO, AUDIO_BOS, AUDIO_EOS, EOS)}


# -- layout and plans -------------------------------------------------------------------------------
def test_layout_blocks_by_when_they_run(folder, tmp_path):
    from edge_runtime.models.base import ModelSource
    from edge_runtime.models.vibevoice.family import VibeVoiceSpeechModel

    layout = VibeVoiceSpeechModel.layout(ModelSource(VibeVoiceSpeechModel, "tiny", folder), torch.bfloat16)
    comps = {c.name: c for c in layout.components}
    assert {n: c.kind for n, c in comps.items()} == {
        "acoustic_encoder": "once", "embeddings": "autoregressive", "lm": "autoregressive",
        "lm_head": "autoregressive", "connectors": "autoregressive", "diffusion_head": "autoregressive",
        "acoustic_decoder": "autoregressive", "semantic_encoder": "autoregressive", "other": "autoregressive"}
    assert [c.name for c in layout.components if c.quantizable] == ["lm"]  # tied lm_head: the LM's layers only
    assert len(comps["lm"].blocks) == 4 and comps["lm"].passes_per_token == 2  # prompt + unconditional branch
    assert comps["diffusion_head"].passes_per_token == 10  # generation_config has no num_diffusion_steps
    assert comps["acoustic_decoder"].token_cap == comps["semantic_encoder"].token_cap == 1  # one frame a call
    # the tokenizer stacks are split into their conv layers (a small card streams the encoder through)
    assert len(comps["acoustic_encoder"].blocks) == 1 + 7 + 6 + 1
    names = [b.name for b in layout.blocks]  # blocks never nest: no name is a prefix of another
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)
    fp32 = {b.name for b in layout.blocks if b.compute_bytes == 4}
    assert comps["acoustic_encoder"].fp32 and {"model.latent_scaling_factor", "model.latent_bias_factor"} <= fp32
    assert all(b.compute_bytes == 2 for c in ("lm", "diffusion_head", "acoustic_decoder") for b in comps[c].blocks)
    assert layout.max_positions == 2048 and layout.prompt_tokens_per_s == 7.5
    assert layout.tokens_per_char > 7.5 / 14  # frames + text tokens per character
    # a generation_config.json that sets num_diffusion_steps: the plan counts (and synthesis runs) that many
    from edge_runtime.models.vibevoice.scheduler import read_settings

    configs = shutil.copytree(folder, tmp_path / "steps", ignore=shutil.ignore_patterns("*.safetensors*"))
    settings = json.loads((configs / "generation_config.json").read_text())
    (configs / "generation_config.json").write_text(json.dumps({**settings, "num_diffusion_steps": 4}))
    assert read_settings(configs).steps == 4 and read_settings(configs).guidance_scale == 1.3
    layout = VibeVoiceSpeechModel.layout(ModelSource(VibeVoiceSpeechModel, "steps", configs), torch.bfloat16)
    assert layout.component("diffusion_head").passes_per_token == 4


def test_published_configs_and_their_plans(tmp_path, capsys):
    """The published shapes from configs alone: 2.70B / 9.34B parameters; VibeVoice-1.5B on 6 GB in bf16
    with nothing quantized and every per-frame block on the GPU; VibeVoice-Large's untied lm_head may be
    quantized like its layers (the tied 1.5B one may not)."""
    folders = vibevoice_configs.write_all(tmp_path)
    for name, published in vibevoice_configs.PUBLISHED_PARAMS.items():
        assert abs(vibevoice_configs.param_count(name) - published) < 0.01e9, name
    capsys.readouterr()
    assert main(["plan", "--model", str(folders["vibevoice-1.5b"]), "--profile", "6gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dtype"] == "bf16" and not plan["quantized_blocks"]
    assert all(b["placement"] == "gpu" for b in plan["blocks"] if b["autoregressive"])
    assert plan["peak_vram_bytes"] <= 6 * 1024**3

    from edge_runtime.models import registry

    source = registry.resolve(str(folders["vibevoice-large"]), weights=False)
    comps = {c.name: c for c in source.family.layout(source, torch.bfloat16).components}
    assert [n for n, c in comps.items() if c.quantizable] == ["lm", "lm_head"]
    assert comps["lm"].blocks[0].linear_shapes[0] == (3584, 3584)  # q_proj of Qwen2.5-7B


# -- synthesis ----------------------------------------------------------------------------------------
def test_synthesize_without_voice(rt, resident):
    adapter = rt.model
    assert adapter.guidance_scale == 1.3 and adapter.diffusion.steps == 10  # generation_config.json is read
    assert adapter.scheduler.config.prediction_type == "v_prediction"
    audio, rate = rt.synthesize(TEXT, seed=1)
    check_audio(audio, rate)
    assert np.array_equal(audio, resident["plain"])  # seeded: the diffusion noise is reproducible
    assert audio.size == frames_of(adapter, TEXT) * HOP  # one 3200-sample frame per step, to the cap
    assert not np.array_equal(rt.synthesize(TEXT, seed=2)[0], audio)
    # noise_scale 0: no starting noise, deterministic without a seed
    quiet = rt.synthesize(TEXT, noise_scale=0.0)[0]
    check_audio(quiet)
    assert np.array_equal(rt.synthesize(TEXT, noise_scale=0.0)[0], quiet) and not np.array_equal(quiet, audio)


def test_voice_prompt_encoded_once(rt, resident, prompt_wav, tmp_path):
    adapter = rt.model
    before = adapter.calls["encode_prompt"]
    vid, voice, hit = rt.prepare_voice(str(prompt_wav))
    assert hit and vid == resident["voice_id"] and adapter.calls["encode_prompt"] == before
    assert voice.tensors["latents"].dtype == torch.float32 and voice.tensors["latents"].shape[1] == 8
    assert voice.extra["frames"] == voice.tensors["latents"].shape[0] > 1

    # synthesis reuses the cached latents: the acoustic encoder itself never runs again
    encoder_calls, handle = [], adapter.model.model.audio_tower.encoder.register_forward_pre_hook(
        lambda *_: encoder_calls.append(1))
    try:
        first, rate = rt.synthesize(VOICE_TEXT, voice=vid, seed=3)
        check_audio(first, rate)
        assert np.array_equal(rt.synthesize(VOICE_TEXT, voice=vid, seed=3)[0], first)
        # a voice saved to the library (safetensors + JSON) and loaded back synthesises the same
        library = VoiceLibrary(tmp_path)
        library.save(vid, voice)
        assert np.array_equal(rt.synthesize(VOICE_TEXT, voice=library.load(vid), seed=3)[0], first)
    finally:
        handle.remove()
    assert not encoder_calls and adapter.calls["encode_prompt"] == before
    # the voice conditions the output (same seed, same sentence without it differs)
    assert not np.array_equal(resident["voice"], resident["plain"])


def test_cached_latents_equal_transformers_raw_audio_path(rt, stock, clip):
    """Our prompt (cached latents scattered over the placeholders, fed as inputs_embeds with the ids) is
    token for token the processor's, and generate() on it gives bit for bit what transformers' own
    generate() gives from the raw waveform (input_values): same seed, guidance 1.3, CFG processor and all."""
    model, processor = stock
    adapter = rt.model
    voice = adapter.prepare_voice(clip, SAMPLE_RATE)
    inputs = stock_inputs(processor, TEXT, clip)
    ours = adapter._prompt([TEXT], voice)
    assert torch.equal(ours.input_ids, inputs["input_ids"]) and torch.equal(ours.attention_mask, inputs["attention_mask"])
    cap = adapter.max_new_tokens(TEXT, ours.length)
    torch.manual_seed(5)
    expected = model.generate(**inputs, sample=False, max_new_tokens=cap)[0]
    from edge_runtime.models.base import SynthesisSettings

    audio = np.concatenate(list(adapter.synthesize_unit(TEXT, SynthesisSettings(seed=5), voice)))
    assert np.array_equal(audio, expected.reshape(-1).clamp(-1, 1).numpy())


def test_lm_passes_per_frame_before_and_after(rt, stock, clip):
    """Forced: 4 diffusion frames, audio eos, eos. transformers' generate() runs the LM 3 times per
    diffusion frame (prompt branch, VibeVoice's negative branch, the generic CFG processor's extra pass)
    and 2 per other step; ours 2 and 1. The audio is the same, bit for bit."""
    model, processor = stock
    adapter = rt.model
    ids = token_ids(processor)
    voice = adapter.prepare_voice(clip, SAMPLE_RATE)
    inputs = stock_inputs(processor, TEXT, clip)
    prompt = adapter._prompt([TEXT], voice)
    frames, steps = 4, 6
    from transformers import LogitsProcessorList

    counted = {}
    for name, target, kwargs in (("stock", model, dict(inputs, sample=False)),
                                 ("ours", adapter.model, dict(input_ids=prompt.input_ids,
                                                              inputs_embeds=prompt.inputs_embeds,
                                                              attention_mask=prompt.attention_mask))):
        calls, handle = lm_passes(target)
        try:
            torch.manual_seed(11)
            with torch.inference_mode():
                out = target.generate(**kwargs, max_new_tokens=20, return_dict_in_generate=True,
                                      logits_processor=LogitsProcessorList([Force(frames, ids)]))
        finally:
            handle.remove()
        assert out.sequences.shape[1] - inputs["input_ids"].shape[1] == steps  # stopped at eos
        counted[name] = (len(calls), out.audio[0])
    assert counted["stock"][0] == steps + frames + steps  # 3 per diffusion frame, 2 per control step
    assert counted["ours"][0] == steps + frames  # 2 per diffusion frame, 1 per control step
    assert counted["ours"][1].shape[-1] == frames * HOP
    assert torch.equal(counted["ours"][1], counted["stock"][1])
    assert rt.model.describe()["lm_passes_per_frame"] == 2


@pytest.mark.parametrize("uncond_margin", [0.3, 0.5, 5.0])
def test_lm_guidance_changes_a_choice_only_as_the_rule_says(rt, stock, uncond_margin):
    """What the removed processor did: scores g*log p_cond + (1-g)*log p_uncond over the four allowed
    tokens. Logits set to cond {diffusion 1.0, audio eos 0.9} and uncond {diffusion m}: with g = 1.3 the
    choice flips to audio eos exactly when 0.3 m > 1.3 * 0.1 (m > 0.43). Below that our output is
    transformers' bit for bit; above it transformers' generate() never speaks (audio eos every step) while
    ours keeps the conditional choice, as Microsoft's original generate() does (no CFG on tokens)."""
    model, processor = stock
    adapter = rt.model
    ids = token_ids(processor)
    g = 1.3
    cond = {ids[AUDIO]: 1.0, ids[AUDIO_EOS]: 0.9}
    uncond = {ids[AUDIO]: uncond_margin}
    flips = (g - 1) * uncond_margin > g * (cond[ids[AUDIO]] - cond[ids[AUDIO_EOS]])

    def bias(module, args, kwargs, out):  # the CFG processor calls model(input_ids, ...) positionally
        chosen = uncond if args else cond
        out.logits[:, -1, list(chosen)] += torch.tensor(list(chosen.values()))
        return out

    prompt = adapter._prompt([TEXT], None)
    results = {}
    for name, target in (("stock", model), ("ours", adapter.model)):
        handle = target.register_forward_hook(bias, with_kwargs=True)
        try:
            torch.manual_seed(2)
            with torch.inference_mode():
                out = target.generate(input_ids=prompt.input_ids, inputs_embeds=prompt.inputs_embeds,
                                      attention_mask=prompt.attention_mask, max_new_tokens=5,
                                      return_dict_in_generate=True)
        finally:
            handle.remove()
        results[name] = (out.sequences[0, prompt.length:].tolist(), out.audio[0])
    assert results["ours"][0] == [ids[AUDIO]] * 5  # the conditional argmax
    if flips:
        assert results["stock"][0] == [ids[AUDIO_EOS]] * 5 and results["stock"][1] is None
    else:
        assert results["stock"][0] == results["ours"][0]
        assert torch.equal(results["stock"][1], results["ours"][1])


def test_stream_yields_frames_as_decoded(rt, resident):
    chunks = list(rt.stream(TEXT, voice=resident["voice_id"], seed=7))
    assert len(chunks) == frames_of(rt.model, TEXT, rt.voice_cache.get(resident["voice_id"]))
    assert all(c.dtype == np.float32 and c.size == HOP for c in chunks)
    assert np.array_equal(np.concatenate(chunks), resident["voice"])
    # a consumer that stops listening stops the generation (no thread left behind)
    stream = rt.stream(VOICE_TEXT, seed=1)
    assert next(stream).size == HOP
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "vibevoice-generate"]


@pytest.mark.parametrize("with_voice", [False, True])
def test_batch_matches_one_by_one(rt, resident, monkeypatch, with_voice):
    """One generate() for the batch (left-padded prompts); without starting noise each sentence equals its
    solo run to float rounding (padding changes the LM's matmul shapes) and keeps its own frame cap."""
    texts = [TEXT, "How are you?"]
    voice = resident["voice_id"] if with_voice else None
    alone = [rt.synthesize(t, voice=voice, noise_scale=0.0)[0] for t in texts]
    generates = []
    real = rt.model.model.generate
    monkeypatch.setattr(rt.model.model, "generate", lambda *a, **k: generates.append(1) or real(*a, **k))
    batched = rt.synthesize_batch(texts, voice=voice, max_batch=len(texts), noise_scale=0.0)
    assert len(generates) == 1
    for single, (audio, rate) in zip(alone, batched):
        check_audio(audio, rate)
        assert audio.size == single.size and np.allclose(audio, single, atol=1e-4)
    assert batched[0][0].size < batched[1][0].size


# -- backends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["streamer", "accelerate", "deepspeed"])
def test_offloaded_equals_resident(folder, resident, prompt_wav, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    # ZeRO-3 cannot compute on the CPU: what the others compute there it streams, from RAM
    extra = ("offload.target=cpu",) if backend == "deepspeed" else ()
    off = edge_runtime.load(model=str(folder), profile="6gb", overrides=(TIER_VRAM, *TIER, f"offload.backend={backend}",
                                                                          *extra))
    try:
        assert off.placement["backend"] == backend and off.placement["streamed_bytes"] > 0
        streamed = [b for b in off.plan.blocks if b.placement.startswith("stream:")]
        assert len(streamed) >= 2 and all(b.component == "acoustic_encoder" for b in streamed)
        assert all(b.placement == "gpu" for b in off.plan.blocks if b.autoregressive)  # every per-frame block
        # same weights, same ops on the same device: bit-identical
        assert np.array_equal(off.synthesize(TEXT, seed=1)[0], resident["plain"])
        assert np.array_equal(off.synthesize(TEXT, voice=str(prompt_wav), seed=7)[0], resident["voice"])
        if backend == "streamer":
            assert off.placement["bytes_moved"] > 0
    finally:
        off.close()


@pytest.mark.parametrize("backend", ["streamer", "accelerate"])
def test_offloaded_per_frame_blocks(folder, resident, prompt_wav, backend):
    """A hand-made plan streaming per-frame blocks from disk as well (the planner keeps them resident
    or computes them on the CPU here; on a GPU it may stream them): the diffusion head, connectors, an
    LM layer, the decoder's first layers and the model's very first parameter (the acoustic encoder's
    stem, which transformers takes as the model's device). Their parameters wait on the meta device;
    generate() still runs on the execution device and equals resident."""
    import dataclasses

    from edge_runtime.runtime.engine import Runtime
    from edge_runtime.runtime.loader import BackendPlacer, Placement, resolve

    resolution = resolve(str(folder), profile="6gb", overrides=(TIER_VRAM, *TIER, f"offload.backend={backend}"))
    chosen = ("model.diffusion_head", "model.multi_modal_projector", "model.semantic_connector",
              "model.language_model.layers.1", "model.audio_tower.decoder.stem", "model.audio_tower.encoder.stem.conv")
    plan = resolution.plan
    blocks = tuple(dataclasses.replace(b, placement="stream:disk") if b.name.startswith(chosen) else b
                   for b in plan.blocks)
    resolution = dataclasses.replace(resolution, plan=dataclasses.replace(plan, blocks=blocks))
    placer = BackendPlacer(resolution)
    model = resolution.source.family.load(resolution.source, placer)
    off = Runtime(model, resolution.profile, device="cpu", plan=resolution.plan,
                  placement=Placement(resolution.plan, backend, "cpu", placer.handles))
    try:
        inner = model.model.model
        assert next(inner.diffusion_head.parameters()).is_meta  # what VibeVoice's generate() reads
        assert next(model.model.parameters()).is_meta  # PreTrainedModel.device would say meta
        # streamed Linear weights are used where the checkpoint maps them (unaligned): CPU GEMMs round
        # those in the last bit differently, so equal to float rounding (the tokens are the same)
        np.testing.assert_allclose(off.synthesize(TEXT, seed=1)[0], resident["plain"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(off.synthesize(TEXT, voice=str(prompt_wav), seed=7)[0], resident["voice"],
                                   rtol=0, atol=1e-5)
        assert off.placement["bytes_moved"] > 0
    finally:
        off.close()


def test_bf16_keeps_fp32_parts_fp32(folder, prompt_wav):
    runtime = edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD, dtype="bf16")
    try:
        inner = runtime.model.model.model
        assert {p.dtype for p in inner.audio_tower.encoder.parameters()} == {torch.float32}
        assert inner.latent_scaling_factor.dtype == inner.latent_bias_factor.dtype == torch.float32
        rest = {p.dtype for n, p in runtime.model.model.named_parameters()
                if not n.startswith(("model.audio_tower.encoder.", "model.latent_"))}
        assert rest == {torch.bfloat16}
        check_audio(runtime.synthesize(TEXT, seed=2)[0])
        check_audio(runtime.synthesize(TEXT, voice=str(prompt_wav), seed=2)[0])  # fp32 latents -> bf16 LM
    finally:
        runtime.close()


def quantized_run(folder, profile: str, overrides: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    runtime = edge_runtime.load(model=str(folder), profile=profile, overrides=(*overrides, "quantization.force=int8"))
    try:
        return runtime.synthesize(TEXT, seed=1)[0], {"quantized": runtime.plan.quantized_blocks(),
                                                     "backend": runtime.placement["backend"],
                                                     "streamed_bytes": runtime.placement["streamed_bytes"]}
    finally:
        runtime.close()


def test_quantized_int8_paths_agree(folder, resident):
    """quantization.force=int8 stores the LM's decoder layers int8 (never the embeddings, the tied lm_head,
    the diffusion head, connectors or tokenizers); resident, streamer and accelerate agree bit for bit."""
    audio, info = quantized_run(folder, "cpu", ONE_THREAD)
    check_audio(audio)
    assert sorted(info["quantized"]) == [f"model.language_model.layers.{i}" for i in range(4)]
    assert set(info["quantized"].values()) == {"int8"}
    assert audio.size == resident["plain"].size and not np.array_equal(audio, resident["plain"])
    # a smaller tier than TIER_VRAM: the int8 LM leaves room enough to hold everything at that one
    tier = ("memory.vram_gib=0.012", *(o for o in TIER if not o.startswith("quantization.")))
    for backend in ("streamer", "accelerate"):
        other, details = quantized_run(folder, "6gb", (*tier, f"offload.backend={backend}"))
        assert details["backend"] == backend and details["quantized"] == info["quantized"]
        assert details["streamed_bytes"] > 0
        assert np.array_equal(other, audio), backend


# -- CLI and server ------------------------------------------------------------------------------------
def test_say_with_voice(folder, prompt_wav, tmp_path):
    out = tmp_path / "vibevoice.wav"
    assert main(["say", "--model", str(folder), "--voice", str(prompt_wav), "--seed", "3",
                 "--set", "runtime.threads=1", f"{TEXT} {VOICE_TEXT}", "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == SAMPLE_RATE and len(audio) > 0 and np.isfinite(audio).all()


def test_server_speech_with_an_uploaded_voice(rt, prompt_wav):
    import io

    import httpx

    openai = pytest.importorskip("openai")
    from server_support import ServerThread
    from edge_runtime.serving.server import ServerSettings, create_app

    with ServerThread(create_app(rt, ServerSettings(warm_up=False))) as server:
        up = httpx.post(f"{server.url}/v1/voices", timeout=120,
                        files={"file": ("me.wav", Path(prompt_wav).read_bytes(), "audio/wav")})
        assert up.status_code in (200, 201), up.text
        voice_id = up.json()["id"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        whole = client.audio.speech.create(model=rt.model.model_id, voice=voice_id, input=TEXT, response_format="wav")
        audio, rate = sf.read(io.BytesIO(whole.content))
        assert rate == SAMPLE_RATE and len(audio) > 0
        with client.audio.speech.with_streaming_response.create(
                model=rt.model.model_id, voice=voice_id, input=TEXT, response_format="pcm") as response:
            pcm = b"".join(response.iter_bytes())
        assert len(pcm) == 2 * len(audio)  # the stream carries the whole utterance, 16-bit
        bad = httpx.post(f"{server.url}/v1/audio/speech", timeout=120,
                         json={"model": rt.model.model_id, "input": f"Hi {AUDIO} there.", "voice": voice_id})
        assert 400 <= bad.status_code < 500 and "control token" in bad.text


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_folders_are_named(folder, tmp_path, capsys):
    shards = check_missing_shard_is_named(folder, tmp_path, capsys, TEXT)

    no_weights = shutil.copytree(folder, tmp_path / "no-weights")
    for shard in [*shards, "model.safetensors.index.json"]:
        (no_weights / shard).unlink()
    with pytest.raises(ModelNotFoundError, match="config files only"):
        edge_runtime.load(model=str(no_weights), profile="cpu")

    no_template = shutil.copytree(folder, tmp_path / "no-template")
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ModelNotFoundError, match="chat template"):
        edge_runtime.load(model=str(no_template), profile="cpu")

    foreign = shutil.copytree(folder, tmp_path / "foreign")
    config = json.loads((foreign / "config.json").read_text())
    config["architectures"] = ["VibeVoiceForAudioClassification"]
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="VibeVoiceForAudioClassification"):
        edge_runtime.load(model=str(foreign), profile="cpu")


def test_missing_diffusers_is_named(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ModelNotFoundError, match=r"edge-runtime\[vibevoice\]"):
        edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD)


def test_bad_prompts_and_settings(rt):
    with pytest.raises(InvalidInputError, match="NaN"):
        rt.prepare_voice(np.full(SAMPLE_RATE, np.nan, dtype=np.float32), sample_rate=SAMPLE_RATE)
    too_long = rt.profile.limits.max_prompt_seconds + 1
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, int(too_long * 8000)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="max_prompt_seconds"):
        rt.prepare_voice(noise, sample_rate=8000)
    with pytest.raises(InvalidInputError, match="speaking-rate"):
        rt.synthesize(TEXT, speed=1.5)
    with pytest.raises(InvalidInputError, match="noise_w"):
        rt.synthesize(TEXT, noise_w=0.5)
    with pytest.raises(InvalidInputError, match="control token"):
        rt.synthesize(f"Say {AUDIO_BOS} this.")
    with pytest.raises(InvalidInputError, match="built-in speakers"):
        rt.synthesize(TEXT, speaker="alice")
