"""Higgs Audio V2 through the real loading path (edge_runtime.load on a tiny random folder saved SHARDED):
the layout (per-frame blocks, prefill-only text FFNs and text embedding, the fp32 audio tokenizer), the
published shape planned from configs alone, synthesis with and without a voice, the voice encoded once
and its inputs equal to the processor's, the text FFN counted once per sentence and the audio FFN per
frame, every backend (and the quantized paths) equal to resident, bf16 with the tokenizer fp32, the CLI
and the server, and bad folders / prompts rejected with clear errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import SynthesisSettings
from edge_runtime.runtime.voices import VoiceLibrary
from edge_runtime.serving.cli import main
from hf_support import check_missing_shard_is_named, quantized_cache, speech_prompt  # noqa: F401 (an autouse fixture)
from hf_tiny_higgs import SAMPLE_RATE, build_tiny_higgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import higgs_configs  # noqa: E402

TEXT = "Hi there."
VOICE_TEXT = "Hello again."
TRANSCRIPT = "This is my voice."
# Tiny models are overhead-bound; two threads on a busy 2-core machine spin-wait each other.
ONE_THREAD = ("runtime.threads=1",)
# A GPU tier the tiny model fits only by streaming (from disk) what does not run per frame: the text
# FFNs, the text embedding and parts of the audio tokenizer; every per-frame block stays on the device.
# No quantization: the planner would otherwise compress LM layers before streaming (outputs differ).
TIER = ("memory.reserve_gib=0", "batching.max_batch=1", "offload.keep_resident=[]", "precision.dtype=fp32",
        "offload.target=disk", "limits.max_text_chars=60", "limits.max_prompt_seconds=3", *ONE_THREAD)
TINY_TIER = ("memory.vram_gib=0.0112", "quantization.allowed=[]", *TIER)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_higgs(tmp_path_factory.mktemp("higgs") / "tiny-higgs")


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
    voice, _, _ = rt.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)
    return {"greedy": rt.synthesize(TEXT, noise_scale=0.0)[0], "voice_id": voice,
            "voice": rt.synthesize(TEXT, voice=voice, seed=7)[0]}


def copy_folder(folder: Path, dest: Path, tokenizer_path: str = "audio_tokenizer") -> Path:
    """A copy whose processor_config.json names ``tokenizer_path`` (by default its own tokenizer, by a
    path relative to the folder; the saved one is the original's absolute path)."""
    copy = shutil.copytree(folder, dest)
    settings = json.loads((copy / "processor_config.json").read_text())
    settings["audio_tokenizer"]["audio_tokenizer_name_or_path"] = tokenizer_path
    (copy / "processor_config.json").write_text(json.dumps(settings))
    return copy


def check_audio(audio: np.ndarray, rate: int) -> None:
    assert rate == SAMPLE_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


# -- layout and plans -------------------------------------------------------------------------------
def test_layout_splits_each_layer_by_when_it_runs(folder):
    from edge_runtime.models.base import ModelSource
    from edge_runtime.models.higgs_audio_v2 import HiggsAudioV2SpeechModel

    layout = HiggsAudioV2SpeechModel.layout(ModelSource(HiggsAudioV2SpeechModel, "tiny", folder), torch.bfloat16)
    comps = {c.name: c for c in layout.components}
    assert {n: c.kind for n, c in comps.items()} == {
        "text_embedding": "prefill", "text_ffn": "prefill", "audio_embedding": "autoregressive",
        "lm": "autoregressive", "audio_head": "autoregressive", "other": "autoregressive",
        "codec_encoder": "once", "codec_decoder": "once", "codec.other": "once"}
    assert [c.name for c in layout.components if c.quantizable] == ["lm"]  # the LM's layers only
    layers = 3
    assert len(comps["lm"].blocks) == 4 * layers and len(comps["text_ffn"].blocks) == 3 * layers
    assert {b.name.rsplit(".", 1)[-1] for b in comps["text_ffn"].blocks} == {"input_layernorm", "mlp",
                                                                           "post_attention_layernorm"}
    assert {b.name.rsplit(".", 1)[-1] for b in comps["lm"].blocks} == {
        "audio_input_layernorm", "self_attn", "audio_post_attention_layernorm", "audio_mlp"}
    names = [b.name for b in layout.blocks]  # blocks never nest: no name is a prefix of another
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)
    # the audio tokenizer: a sub-model of its own checkpoint, fp32 whatever the LM's dtype
    codec = [c for c in layout.components if c.name.startswith("codec")]
    assert all(c.fp32 and all(b.submodel == "codec" and b.compute_bytes == 4 for b in c.blocks) for c in codec)
    assert layout.max_positions == 2048 and layout.tokens_per_char > 25 / 14  # frames + text per char


def test_plan_moves_prefill_blocks_off_the_gpu_before_per_frame_blocks(folder):
    """As the tier shrinks, the text FFNs leave the GPU first: whenever some per-frame LM block is off
    the GPU, every text FFN (mlp) is too; and some tier holds every per-frame block only that way."""
    from edge_runtime.runtime.loader import resolve

    seen_fit_with_prefill_off = False
    for vram in ("0.0105", "0.011", "0.0112", "0.0115", "0.012"):
        plan = resolve(str(folder), profile="6gb", overrides=(f"memory.vram_gib={vram}", "quantization.allowed=[]",
                                                              *TIER)).plan
        where = {b.name: b.placement for b in plan.blocks}
        prefill = [n for n in where if n.endswith(".mlp")]
        ar_off = [b.name for b in plan.blocks if b.component == "lm" and b.placement != "gpu"]
        if ar_off:
            assert all(where[n] != "gpu" for n in prefill), (vram, ar_off)
        elif any(where[n] != "gpu" for n in prefill):
            seen_fit_with_prefill_off = True
    assert seen_fit_with_prefill_off  # some tier holds every per-frame block only by moving prefill ones


def test_published_shape_plans_on_8gb_without_quantization(tmp_path, capsys):
    """The 3B-base shape from configs alone (5.38B LM, 0.20B tokenizer): on 8 GB every per-frame block
    on the GPU in bf16, nothing quantized, the prefill-only text FFNs and text embedding off it."""
    published = higgs_configs.write(tmp_path / "higgs-3b")
    assert not higgs_configs.check(published)  # parameter counts as measured
    capsys.readouterr()
    assert main(["plan", "--model", str(published), "--profile", "8gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dtype"] == "bf16" and not plan["quantized_blocks"]
    blocks = plan["blocks"]
    assert all(b["placement"] == "gpu" for b in blocks if b["component"] in ("lm", "audio_head"))
    assert all(b["placement"] != "gpu" for b in blocks
               if b["component"] == "text_embedding" or b["name"].endswith(".mlp"))
    assert plan["peak_vram_bytes"] <= 8 * 1024**3


# -- synthesis ----------------------------------------------------------------------------------------
def test_synthesize_without_voice(rt, resident):
    adapter = rt.model
    # generation_config.json is read: the published decoding, greedy with repetition-aware sampling (random)
    assert adapter.model.generation_config.ras_win_len == 7
    audio, rate = rt.synthesize(TEXT, seed=1)
    check_audio(audio, rate)
    assert np.array_equal(rt.synthesize(TEXT, seed=1)[0], audio)  # seeded: reproducible
    assert not np.array_equal(rt.synthesize(TEXT, seed=2)[0], audio)
    # noise_scale 0: greedy with no randomness at all (repetition-aware resampling off), whatever the seed
    check_audio(resident["greedy"], rate)
    assert np.array_equal(rt.synthesize(TEXT, noise_scale=0.0, seed=5)[0], resident["greedy"])
    assert not np.array_equal(resident["greedy"][: audio.size], audio[: resident["greedy"].size])
    # another noise_scale samples at that temperature
    assert not np.array_equal(rt.synthesize(TEXT, noise_scale=0.7, seed=1)[0], audio)
    # greedy: this model never emits its stream eos (see hf_tiny_higgs), so a sentence runs to its cap:
    # the frames its length allows, every one decoded (960 samples each at 25 frames/s)
    unit = adapter.split_text(TEXT)[0]
    steps = adapter.max_new_tokens(unit, len(adapter.prompt_for(unit, SynthesisSettings(), None).input_ids))
    assert resident["greedy"].size == (steps - adapter.num_codebooks) * 960
    # the scene description follows a request's instructions
    assert not np.array_equal(rt.synthesize(TEXT, noise_scale=0.0, instructions="A loud hall.")[0],
                              resident["greedy"])


def test_stream_is_one_chunk_per_sentence(rt):
    """The DAC decoder is not causal and generate() returns codes only at its end: a streamed request
    yields each sentence whole, as soon as it is decoded, equal to the unstreamed audio."""
    text = f"{TEXT} {VOICE_TEXT}"
    chunks = list(rt.stream(text, noise_scale=0.0))
    assert len(chunks) == len(rt.model.split_text(text)) == 2
    assert np.array_equal(np.concatenate(chunks), rt.synthesize(text, noise_scale=0.0)[0])


def test_voice_prompt_encoded_once(rt, resident, prompt_wav, monkeypatch, tmp_path):
    adapter = rt.model
    before = adapter.calls["encode_prompt"]
    vid, voice, hit = rt.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)
    assert hit and vid == resident["voice_id"] and adapter.calls["encode_prompt"] == before
    assert voice.transcript == TRANSCRIPT and voice.extra["frames"] > 10
    codes = voice.tensors["audio_input_ids"]
    assert codes.shape == (voice.extra["frames"] + 1 + adapter.num_codebooks, adapter.num_codebooks)

    # synthesis reuses the stored codes: the tokenizer's encoder never runs again
    encodes = []
    real_encode = adapter.codec.encode
    monkeypatch.setattr(adapter.codec, "encode", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    first, rate = rt.synthesize(VOICE_TEXT, voice=vid, noise_scale=0.0)
    check_audio(first, rate)
    assert np.array_equal(rt.synthesize(VOICE_TEXT, voice=vid, noise_scale=0.0)[0], first)
    assert adapter.calls["encode_prompt"] == before and not encodes
    assert np.array_equal(rt.synthesize(TEXT, voice=vid, seed=7)[0], resident["voice"])

    # a voice saved to the library (safetensors + JSON) and loaded back synthesises the same
    library = VoiceLibrary(tmp_path)
    library.save(vid, voice)
    assert np.array_equal(rt.synthesize(VOICE_TEXT, voice=library.load(vid), noise_scale=0.0)[0], first)
    # the prompt conditions the output, and its frames are not decoded: the same length as without it
    alone = rt.synthesize(VOICE_TEXT, noise_scale=0.0)[0]
    assert first.size == alone.size and not np.array_equal(first, alone)


def test_inputs_equal_the_processors(rt, prompt_wav):
    """What we build from cached codes is token for token what HiggsAudioV2Processor.apply_chat_template
    builds from the audio (with the published chat template), with and without a voice."""
    from edge_runtime.runtime.prompts import prepare_prompt

    adapter = rt.model
    clip = prepare_prompt(str(prompt_wav), SAMPLE_RATE, 30)
    voice = adapter.prepare_voice(clip, SAMPLE_RATE, TRANSCRIPT)
    system = [{"role": "system", "content": "Generate audio following instruction."},
              {"role": "scene", "content": "Audio is recorded from a quiet room."}]
    turns = [{"role": "user", "content": TRANSCRIPT},
             {"role": "assistant", "content": [{"type": "audio", "audio": clip}]}]
    for conversation, prepared in ((system + turns, voice), (system, None)):
        conversation = [*conversation, {"role": "user", "content": VOICE_TEXT}]
        expected = adapter.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True, sampling_rate=SAMPLE_RATE,
                                                         return_tensors="pt")
        built = adapter.prompt_for(VOICE_TEXT, SynthesisSettings(), prepared)
        assert expected["input_ids"][0].tolist() == built.input_ids
        if prepared is None:
            assert "audio_input_ids" not in expected and built.audio_input_ids is None
        else:
            assert torch.equal(expected["audio_input_ids"][0], built.audio_input_ids)
            assert bool(expected["audio_input_ids_mask"].all())


def test_no_torchaudio_and_codes_from_our_resampler(rt, prompt_wav):
    """The tokenizer's 24 -> 16 kHz resampling for HuBERT is edge_runtime.dsp.resample: the codes equal
    those of the tokenizer fed HuBERT's input resampled by us, and no torchaudio is ever imported."""
    import importlib.util

    from edge_runtime.dsp import resample
    from edge_runtime.models.higgs_audio_v2 import codec as codec_mod
    from edge_runtime.runtime.prompts import prepare_prompt

    assert "torchaudio" not in sys.modules and importlib.util.find_spec("torchaudio") is None
    adapter = rt.model
    module = codec_mod.tokenizer_module()
    clip = prepare_prompt(str(prompt_wav), SAMPLE_RATE, 30)
    codes = adapter.encode(clip)
    seen = []

    def ours(wave, orig, new):
        seen.append((orig, new))
        return torch.from_numpy(resample(wave[0, 0].numpy(), orig, new))[None, None]

    real = module.torchaudio.functional.resample
    module.torchaudio.functional.resample = ours
    try:
        expected = adapter.encode(clip)
    finally:
        module.torchaudio.functional.resample = real
    assert seen == [(SAMPLE_RATE, 16000)] and torch.equal(codes, expected)
    assert codes.shape == (adapter.num_codebooks, int(np.ceil(clip.size / 960)))


def test_text_ffn_runs_once_per_sentence_audio_ffn_per_frame(rt):
    """Counted on the module calls: per sentence the text FFN (and the text embedding) run once, in the
    prefill, and the audio FFN once per generated frame; two sentences: twice the prefill."""
    adapter = rt.model
    layers = adapter.model.model.layers
    counts = {"text": 0, "audio": 0, "embed": 0, "audio_rows": 0}
    handles = []

    def counter(key, rows_key=None):
        def hook(_module, args):
            if args[0].numel():
                counts[key] += 1
                if rows_key:
                    counts[rows_key] += 1
        return hook

    handles.append(layers[0].mlp.register_forward_pre_hook(counter("text")))
    handles.append(layers[0].audio_mlp.register_forward_pre_hook(counter("audio")))
    handles.append(adapter.model.model.embed_tokens.register_forward_pre_hook(counter("embed")))
    try:
        unit = adapter.split_text(TEXT)[0]
        (steps,) = adapter.generate([unit], SynthesisSettings(noise_scale=0.0), None)
        assert counts["text"] == 1 and counts["embed"] == 1
        assert counts["audio"] == steps.shape[0] - 1  # the prefill's logits give the first step
        assert steps.shape[0] > 10
        counts.update(text=0, audio=0, embed=0)
        rt.synthesize(f"{TEXT} {VOICE_TEXT}", noise_scale=0.0)  # two sentences: two prefills
        assert counts["text"] == 2 and counts["embed"] == 2 and counts["audio"] > 20
    finally:
        for handle in handles:
            handle.remove()


# the published generation has four sentences of different lengths; greedy, this model runs each to its cap
BATCH_TEXTS = ["Hi there.", "How are you today?", "Hello again.", "The quick brown fox."]


@pytest.mark.parametrize("with_voice", [False, True])
def test_batch_equals_one_by_one(rt, resident, monkeypatch, with_voice):
    """One generate() for the batch (text left-padded, the voice's codes repeated per row); greedy, each
    unit's audio is bit-identical to the unit alone, cut at its own step cap."""
    adapter = rt.model
    voice = resident["voice_id"] if with_voice else None
    alone = [rt.synthesize(text, voice=voice, noise_scale=0.0)[0] for text in BATCH_TEXTS]
    generates = []
    real_generate = adapter.model.generate
    monkeypatch.setattr(adapter.model, "generate", lambda *a, **k: generates.append(1) or real_generate(*a, **k))
    batched = rt.synthesize_batch(BATCH_TEXTS, voice=voice, max_batch=len(BATCH_TEXTS), noise_scale=0.0)
    assert len(generates) == 1
    for text, single, (audio, rate) in zip(BATCH_TEXTS, alone, batched):
        check_audio(audio, rate)
        assert np.array_equal(audio, single), text
    assert len({audio.size for audio, _ in batched}) == len(BATCH_TEXTS)  # each its own length


# -- backends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["streamer", "accelerate", "deepspeed"])
def test_offloaded_equals_resident(folder, resident, prompt_wav, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    # ZeRO-3 cannot compute on the CPU and offloads to cpu here; its tier keeps what it streams small
    extra = ("offload.target=cpu",) if backend == "deepspeed" else ()
    off = edge_runtime.load(model=str(folder), profile="6gb",
                            overrides=(*TINY_TIER, f"offload.backend={backend}", *extra))
    try:
        placement = off.placement
        assert placement["backend"] == backend and placement["streamed_bytes"] > 0
        streamed = [b for b in off.plan.blocks if b.placement.startswith("stream:")]
        assert len(streamed) >= 2
        assert all(b.placement == "gpu" for b in off.plan.blocks if b.component == "lm")
        # same weights, same ops on the same device: bit-identical, greedy and seeded sampling alike
        assert np.array_equal(off.synthesize(TEXT, noise_scale=0.0)[0], resident["greedy"])
        voice = off.prepare_voice(str(prompt_wav), transcript=TRANSCRIPT)[0]  # the encoder, placed as planned
        assert np.array_equal(off.synthesize(TEXT, voice=voice, seed=7)[0], resident["voice"])
        if backend == "streamer":
            assert off.placement["bytes_moved"] > 0
    finally:
        off.close()


def test_bf16_keeps_codec_fp32(folder):
    runtime = edge_runtime.load(model=str(folder), profile="cpu", overrides=ONE_THREAD, dtype="bf16")
    try:
        adapter = runtime.model
        assert {p.dtype for p in adapter.codec.parameters()} == {torch.float32}
        assert {b.dtype for b in adapter.codec.buffers() if b.is_floating_point()} == {torch.float32}
        floating = {p.dtype for p in adapter.model.parameters() if p.is_floating_point()}
        assert floating == {torch.bfloat16}
        audio, rate = runtime.synthesize(TEXT, seed=2)
        check_audio(audio, rate)
    finally:
        runtime.close()


def quantized_audio(folder, profile: str, overrides: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    runtime = edge_runtime.load(model=str(folder), profile=profile,
                                overrides=(*overrides, "quantization.force=int8"))
    try:
        from edge_runtime.runtime.backends.quantized_linear import QuantizedLinear

        quantized = runtime.plan.quantized_blocks()
        adapter = runtime.model
        swapped = {name for name, m in adapter.model.named_modules() if isinstance(m, QuantizedLinear)}
        assert swapped and all(any(n.startswith(b + ".") for b in quantized) for n in swapped)
        assert not any(isinstance(m, QuantizedLinear) for m in adapter.codec.modules())
        audio = runtime.synthesize(TEXT, noise_scale=0.0)[0]
        streamed = sum(b.placement.startswith("stream:") for b in runtime.plan.blocks)
        return audio, {"quantized": quantized, "backend": runtime.placement["backend"], "streamed": streamed}
    finally:
        runtime.close()


def test_quantized_int8_paths_agree(folder, resident):
    """quantization.force=int8 stores the LM's per-frame Linear layers int8 (only those of the `lm`
    component: never the text FFN, embeddings, heads or the tokenizer); resident, streamer and
    accelerate produce finite audio, equal to each other."""
    audio, info = quantized_audio(folder, "cpu", ONE_THREAD)
    check_audio(audio, SAMPLE_RATE)
    names = set(info["quantized"])
    assert names and all(".self_attn" in n or ".audio_mlp" in n for n in names)
    assert set(info["quantized"].values()) == {"int8"}
    assert audio.size == resident["greedy"].size and not np.array_equal(audio, resident["greedy"])
    # int8 LM layers free room: a smaller tier than the unquantized one still streams the text FFNs
    tier = ("memory.vram_gib=0.0108", *TIER)
    for backend in ("streamer", "accelerate"):
        other, details = quantized_audio(folder, "6gb", (*tier, f"offload.backend={backend}"))
        assert details["backend"] == backend and details["quantized"] == info["quantized"]
        assert details["streamed"] >= 2
        assert np.array_equal(other, audio), backend


# -- CLI and server ------------------------------------------------------------------------------------
def test_say_with_voice(folder, prompt_wav, tmp_path):
    import soundfile as sf

    out = tmp_path / "higgs.wav"
    assert main(["say", "--model", str(folder), "--voice", str(prompt_wav), "--voice-text", TRANSCRIPT,
                 "--seed", "3", "--set", "runtime.threads=1", f"{TEXT} {VOICE_TEXT}", "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == SAMPLE_RATE and len(audio) > 0 and np.isfinite(audio).all()


def test_server_speech_with_an_uploaded_voice(rt, prompt_wav):
    import io

    import httpx
    import soundfile as sf

    openai = pytest.importorskip("openai")
    from server_support import ServerThread
    from edge_runtime.serving.server import ServerSettings, create_app

    with ServerThread(create_app(rt, ServerSettings(warm_up=False))) as server:
        up = httpx.post(f"{server.url}/v1/voices", data={"transcript": TRANSCRIPT}, timeout=120,
                        files={"file": ("me.wav", Path(prompt_wav).read_bytes(), "audio/wav")})
        assert up.status_code in (200, 201), up.text
        voice_id = up.json()["id"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        whole = client.audio.speech.create(model=rt.model.model_id, voice=voice_id, input=TEXT, response_format="wav")
        audio, rate = sf.read(io.BytesIO(whole.content))
        assert rate == SAMPLE_RATE and len(audio) > 0
        with client.audio.speech.with_streaming_response.create(
                model=rt.model.model_id, voice=voice_id, input=TEXT, response_format="pcm",
                instructions="Audio is recorded in a small studio.") as response:
            pcm = b"".join(response.iter_bytes())
        assert len(pcm) > 0 and len(pcm) % 2 == 0
        silent = io.BytesIO()
        sf.write(silent, np.zeros(16000, np.float32), 16000, format="WAV")
        bad = httpx.post(f"{server.url}/v1/voices", files={"file": ("s.wav", silent.getvalue(), "audio/wav")},
                         timeout=120)
        assert 400 <= bad.status_code < 500 and "silent" in bad.text


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_folders_are_named(folder, tmp_path, capsys):
    check_missing_shard_is_named(folder, tmp_path, capsys, TEXT)

    # the processor's absolute path and our `audio_tokenizer/` both gone: the error names both
    no_codec = copy_folder(folder, tmp_path / "no-codec", str(tmp_path / "moved-away"))
    shutil.rmtree(no_codec / "audio_tokenizer")
    with pytest.raises(ModelNotFoundError, match="audio tokenizer.*moved-away.*audio_tokenizer"):
        edge_runtime.load(model=str(no_codec), profile="cpu")

    # the tokenizer's config without its weights
    no_codec_weights = copy_folder(folder, tmp_path / "no-codec-weights")
    (no_codec_weights / "audio_tokenizer" / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="audio tokenizer folder .* config files only"):
        edge_runtime.load(model=str(no_codec_weights), profile="cpu")

    # a folder moved away from where it was saved: processor_config.json's absolute path is stale, the
    # tokenizer is found beside the LM's files
    from edge_runtime.models.base import ModelSource
    from edge_runtime.models.hf.base import read_config
    from edge_runtime.models.higgs_audio_v2 import HiggsAudioV2SpeechModel

    settings = json.loads((folder / "processor_config.json").read_text())
    assert settings["audio_tokenizer"]["audio_tokenizer_name_or_path"] == str(folder / "audio_tokenizer")
    moved = copy_folder(folder, tmp_path / "moved", str(tmp_path / "moved-away"))
    source = ModelSource(HiggsAudioV2SpeechModel, "moved", moved)
    assert HiggsAudioV2SpeechModel.codec_config(source, read_config(moved))[0] == moved / "audio_tokenizer"

    # a tokenizer whose codebooks do not fit the LM
    foreign = copy_folder(folder, tmp_path / "foreign-codec")
    config = json.loads((foreign / "audio_tokenizer" / "config.json").read_text())
    config["target_bandwidths"] = [0.4]  # 4 codebooks, the LM predicts 8
    (foreign / "audio_tokenizer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="4 codebooks .* does not fit the LM"):
        edge_runtime.load(model=str(foreign), profile="cpu")


def test_bad_prompts_and_settings(rt):
    with pytest.raises(InvalidInputError, match="NaN"):
        rt.prepare_voice(np.full(SAMPLE_RATE, np.nan, dtype=np.float32), sample_rate=SAMPLE_RATE)
    with pytest.raises(InvalidInputError, match="silent"):
        rt.prepare_voice(np.zeros(SAMPLE_RATE, dtype=np.float32), sample_rate=SAMPLE_RATE)
    too_long = rt.profile.limits.max_prompt_seconds + 1
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, int(too_long * 8000)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="max_prompt_seconds"):
        rt.prepare_voice(noise, sample_rate=8000)
    with pytest.raises(InvalidInputError, match="speaking-rate"):
        rt.synthesize(TEXT, speed=1.5)
    with pytest.raises(InvalidInputError, match="noise_scale"):
        rt.synthesize(TEXT, noise_scale=-1.0)
    with pytest.raises(InvalidInputError, match="built-in speakers"):
        rt.synthesize(TEXT, speaker="alice")
    # a prompt longer than the LM's positions: a clear error, not an index error deep in generate()
    adapter = rt.model
    with pytest.raises(InvalidInputError, match="positions"):
        adapter.max_new_tokens("x", int(adapter.config.max_position_embeddings) - 3)
