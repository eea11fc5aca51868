"""CosyVoice2 as a family: plan from the published configs, `say` and the server on a tiny random
folder (official layout), streaming equal to whole-chunk flow + vocoder, every backend equal to
resident, and clear errors for bad folders and prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import edge_runtime
from cosyvoice_support import (check_backend_equals_resident, check_server, published_yaml, require_reference,
                               tiny_model_dir, write_prompt)
from edge_runtime.serving.cli import main

pytestmark = pytest.mark.slow

THREADS = ("runtime.threads=1",)
TEXT = "Hello world, this is a test."


def published_config_folder(root: Path) -> Path:
    """cosyvoice2.yaml and CosyVoice-BlankEN/config.json at CosyVoice2-0.5B's published sizes: what
    `plan` needs before any download (no weights)."""
    root.mkdir(parents=True, exist_ok=True)
    published_yaml(root)  # imports scripts/cosyvoice_testmodel.py (then in sys.modules)
    import cosyvoice_testmodel as testmodel

    sizes = testmodel.SIZES["published"]
    (root / "CosyVoice-BlankEN").mkdir(exist_ok=True)
    qwen = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": sizes["qwen_vocab"],
            "hidden_size": sizes["llm_size"], "intermediate_size": sizes["qwen_ffn"],
            "num_hidden_layers": sizes["qwen_layers"], "num_attention_heads": sizes["qwen_heads"],
            "num_key_value_heads": sizes["qwen_kv_heads"], "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
            "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"}
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(qwen))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    require_reference()
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> Path:
    return write_prompt(tmp_path_factory.mktemp("prompt") / "me.wav")


# -- planning from the published configs -----------------------------------------------------------
@pytest.mark.parametrize("profile", ["6gb", "8gb"])
def test_plan_published_size_before_download(tmp_path, capsys, profile):
    folder = published_config_folder(tmp_path / "cv2")
    assert main(["plan", "--model", str(folder), "--profile", profile, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    by_part: dict[str, list] = {}
    for block in plan["blocks"]:
        by_part.setdefault(block["submodel"], []).append(block)
    assert set(by_part) == {"", "flow", "hift"}
    assert plan["dtype"] == "bf16"
    size = {part: sum(b["bytes"] for b in blocks) for part, blocks in by_part.items()}
    assert 2 * 490e6 < size[""] < 2 * 520e6, size  # Qwen2LM ~506M params in bf16 (tied head counted once)
    assert 2 * 110e6 < size["flow"] < 2 * 115e6, size  # 112.6M
    assert 4 * 20e6 < size["hift"] < 4 * 21.5e6, size  # 20.8M, kept fp32
    assert plan["peak_vram_bytes"] <= float(profile[:-2]) * 1024**3
    assert main(["plan", "--model", str(folder), "--profile", profile]) == 0
    text = capsys.readouterr().out
    assert "flow" in text and "hift" in text and "peak" in text.lower()


# -- the CLI and the runtime on the tiny folder --------------------------------------------------
def test_say_clones_a_voice(tiny, prompt, tmp_path):
    out = tmp_path / "cv.wav"
    assert main(["say", "--model", str(tiny), "--voice", str(prompt), "--voice-text", "A prompt to clone.",
                 "--seed", "3", "--set", "runtime.threads=1", TEXT, "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) > 0 and np.isfinite(audio).all()


def test_modes_reach_the_lm_and_flow(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        zero_shot = rt.prepare_voice(str(prompt), transcript="A prompt to clone.")[1]
        cross = rt.prepare_voice(str(prompt))[1]
        assert zero_shot.extra["mode"] == "zero_shot" and cross.extra["mode"] == "cross_lingual"
        model = rt.model
        settings = edge_runtime.models.base.SynthesisSettings(seed=1)
        assert model.lm_prompt(zero_shot, settings)[1] == zero_shot.tensors["speech_tokens"].tolist()
        assert model.lm_prompt(cross, settings) == ([], [])
        instruct = edge_runtime.models.base.SynthesisSettings(seed=1, instructions="Speak slowly.")
        text_ids, speech = model.lm_prompt(zero_shot, instruct)
        assert speech == [] and text_ids[-1] == model.tokenizer.endofprompt_id
        a = rt.synthesize(TEXT, voice=zero_shot, seed=5)[0]
        b = rt.synthesize(TEXT, voice=zero_shot, seed=5)[0]
        c = rt.synthesize(TEXT, voice=zero_shot, seed=5, instructions="Speak slowly.")[0]
        assert np.array_equal(a, b) and len(a) > 0  # seeded: reproducible
        assert not (len(a) == len(c) and np.array_equal(a, c))  # the instruction changed the LM's input
        assert zero_shot.nbytes > 0 and rt.voice_cache.stats()["bytes"] >= zero_shot.nbytes
    finally:
        rt.close()


def test_cpu_profile_decodes_with_bf16_weights_and_keeps_the_rest_fp32(tiny):
    """The LM is bandwidth-bound on a CPU: the cpu profile gives it bf16 weights; flow and HiFT
    (compute-bound) stay fp32, and precision.cpu_decoder_dtype=fp32 restores an all-fp32 model."""
    dtypes = {}
    for setting in ("bf16", "fp32"):
        rt = edge_runtime.load(str(tiny), profile="cpu", overrides=(*THREADS, f"precision.cpu_decoder_dtype={setting}"))
        try:
            m = rt.model
            dtypes[setting] = {name: {p.dtype for p in part.parameters()}
                               for name, part in (("llm", m.lm), ("flow", m.flow), ("hift", m.hift))}
            embeds = m.lm.input_embeds([1, 2, 3, 4], [], [5, 6, 7])
            logits = m.lm.logits(embeds).float()
        finally:
            rt.close()
        dtypes[setting]["logits"] = logits
    assert dtypes["bf16"]["llm"] == {torch.bfloat16} and dtypes["fp32"]["llm"] == {torch.float32}
    for setting in ("bf16", "fp32"):
        assert dtypes[setting]["flow"] == {torch.float32} and dtypes[setting]["hift"] == {torch.float32}
    diff = (dtypes["bf16"]["logits"] - dtypes["fp32"]["logits"]).abs().max().item()
    assert 0 < diff < 0.05 * dtypes["fp32"]["logits"].abs().max().item()  # rounded, not broken


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                                     "CosyVoice-BlankEN/vocab.json", "cosyvoice2.yaml"])
def test_missing_file_is_named(tiny, tmp_path, capsys, missing):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    (broken / missing).unlink()
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert missing in err and "Traceback" not in err


def test_cosyvoice2_yaml_under_cosyvoice3s_name_is_named(tiny, tmp_path, capsys):
    v3 = tmp_path / "cv3"
    shutil.copytree(tiny, v3)
    (v3 / "cosyvoice2.yaml").rename(v3 / "cosyvoice3.yaml")
    assert main(["say", "--model", str(v3), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "cosyvoice3.yaml builds CosyVoice2's" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_named(tiny, tmp_path, capsys):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    data = (broken / "flow.pt").read_bytes()
    (broken / "flow.pt").write_bytes(data[: len(data) // 2])
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "flow.pt" in err and "Traceback" not in err


def test_checkpoint_of_another_size_is_named(tiny, tmp_path, capsys):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    sd = torch.load(broken / "hift.pt", weights_only=True)
    sd.pop(next(iter(sd)))
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, broken / "hift.pt")
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "hift.pt" in err and "missing" in err and "unexpected" in err


@pytest.mark.parametrize("kind", ["silent", "long"])
def test_bad_prompt_exits_2(tiny, tmp_path, capsys, kind):
    seconds = 1.0 if kind == "silent" else 31.0
    n = int(16000 * seconds)
    wave = np.zeros(n) if kind == "silent" else 0.3 * np.sin(2 * np.pi * 150 * np.arange(n) / 16000)
    path = tmp_path / "p.wav"
    sf.write(path, wave.astype(np.float32), 16000)
    code = main(["say", "--model", str(tiny), "--voice", str(path), "--set", "limits.max_prompt_seconds=60",
                 "--set", "runtime.threads=1", TEXT, "-o", str(tmp_path / "x.wav")])
    assert code == 2
    err = capsys.readouterr().err
    assert ("silent" in err if kind == "silent" else "30" in err) and "Traceback" not in err


# -- the server -------------------------------------------------------------------------------------
def test_server_voice_upload_speech_stream_and_instructions(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        check_server(rt, prompt, TEXT)
    finally:
        rt.close()


# -- every backend gives the resident audio --------------------------------------------------------
# A tier too small for anything: the LM's layers compute on the CPU, the flow streams its blocks (the
# text embedding, only looked up, stays on the CPU).
# Its LM reads bf16 weights on the CPU, as the cpu profile's does (precision.cpu_decoder_dtype).
TINY_TIER = ("memory.vram_gib=0.004", "memory.reserve_gib=0", "offload.keep_resident=[]",
             "batching.max_batch=1", "precision.dtype=fp32", "precision.cpu_decoder_dtype=bf16",
             "runtime.threads=1")


@pytest.fixture(scope="module")
def resident_audio(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        assert rt.placement["backend"] == "resident"
        voice = rt.prepare_voice(str(prompt), transcript="A prompt to clone.")[1]
        return voice, rt.synthesize(TEXT, voice=voice, seed=4)[0], list(rt.stream(TEXT, voice=voice, seed=4))
    finally:
        rt.close()


# (accelerate on a cpu target places nothing differently from disk here: the toy family covers it)
@pytest.mark.parametrize("backend,target", [("accelerate", "disk"), ("streamer", "disk"), ("deepspeed", "cpu")])
def test_every_backend_gives_the_resident_audio(tiny, resident_audio, backend, target):
    # ZeRO-3 cannot compute on the CPU: its AR layers stream and keep their KV cache on the device
    tier = (*TINY_TIER, "memory.vram_gib=0.005") if backend == "deepspeed" else TINY_TIER
    check_backend_equals_resident(tiny, resident_audio, TEXT, 4, tier, backend, target)
