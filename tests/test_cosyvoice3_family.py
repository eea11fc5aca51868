"""CosyVoice3 in the CosyVoice family: the folder detector (v2 or v3 from the files, mixed folders
refused by name), plan from the published configs, `say` (clone, cross-lingual, instruct) and the
server on a tiny random folder written by our own modules (scripts/cosyvoice3_testmodel.py; parity
with upstream is tests/test_cosyvoice3_*.py's, on the fixtures), and every backend equal to resident."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import edge_runtime
from cosyvoice_support import check_backend_equals_resident, check_server, write_prompt
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import folder as files
from edge_runtime.serving.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "cosyvoice3"
THREADS = ("runtime.threads=1",)
TEXT = "Hello world, this is a test."


def _testmodel():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cosyvoice3_testmodel
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return cosyvoice3_testmodel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv3") / "tiny"
    _testmodel().write_folder(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> Path:
    return write_prompt(tmp_path_factory.mktemp("prompt") / "me.wav")


def published_config_folder(root: Path) -> Path:
    """cosyvoice3.yaml and CosyVoice-BlankEN/config.json at Fun-CosyVoice3-0.5B-2512's sizes: what
    `plan` reads before any download."""
    testmodel = _testmodel()
    sizes = testmodel.SIZES["published"]
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    (root / "cosyvoice3.yaml").write_text(testmodel.fixtures.TINY_YAML.format(**sizes))
    qwen = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **testmodel.fixtures.PUBLISHED_QWEN,
            "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"}
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(qwen))
    return root


# -- which version a folder is ------------------------------------------------------------------------
def test_detector_picks_the_version_from_the_files(tiny, tmp_path):
    assert files.detect(tiny) is files.V3
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cosyvoice2.yaml").write_text("llm: !new:cosyvoice.llm.llm.Qwen2LM\nhift: !new:cosyvoice.hifigan.generator.HiFTGenerator\n")
    assert files.detect(v2) is files.V2
    bare = tmp_path / "bare"  # no yaml: the speech tokenizer tells, and the missing yaml is named
    bare.mkdir()
    (bare / "speech_tokenizer_v3.onnx").write_bytes(b"x")
    with pytest.raises(edge_runtime.errors.ModelNotFoundError, match="cosyvoice3.yaml"):
        files.check_files(bare)


@pytest.mark.parametrize("mix", ["both_yamls", "v2_tokenizer", "v2_yaml_renamed"])
def test_mixed_folder_names_the_files(tiny, tmp_path, capsys, mix):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    if mix == "both_yamls":
        shutil.copy(broken / "cosyvoice3.yaml", broken / "cosyvoice2.yaml")
        named = ("cosyvoice2.yaml", "cosyvoice3.yaml")
    elif mix == "v2_tokenizer":
        (broken / "speech_tokenizer_v3.onnx").rename(broken / "speech_tokenizer_v2.onnx")
        named = ("speech_tokenizer_v2.onnx", "speech_tokenizer_v3.onnx")
    else:  # a CosyVoice3 yaml saved under CosyVoice2's name
        (broken / "cosyvoice3.yaml").rename(broken / "cosyvoice2.yaml")
        named = ("cosyvoice2.yaml", "CausalMaskedDiffWithDiT")
    with pytest.raises(InvalidInputError) as err:
        files.detect(broken)
    assert all(name in str(err.value) for name in named), str(err.value)
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    out = capsys.readouterr().err
    assert named[0] in out and "Traceback" not in out


@pytest.mark.parametrize("missing", ["speech_tokenizer_v3.onnx", "cosyvoice3.yaml", "llm.pt"])
def test_missing_file_is_named(tiny, tmp_path, capsys, missing):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    (broken / missing).unlink()
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert missing in err and "Traceback" not in err


def test_cosyvoice2_checkpoint_in_a_cosyvoice3_folder_is_named(tiny, tmp_path, capsys):
    broken = tmp_path / "cv"
    shutil.copytree(tiny, broken)
    state = torch.load(broken / "llm.pt", weights_only=True)
    state["llm_embedding.weight"] = torch.zeros(2, state["speech_embedding.weight"].shape[1])  # v2's sos/task table
    torch.save(state, broken / "llm.pt")
    assert main(["say", "--model", str(broken), TEXT, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "llm.pt" in err and "unexpected" in err and "cosyvoice3.yaml" in err


# -- planning from the published configs ---------------------------------------------------------------
@pytest.mark.parametrize("profile", ["6gb", "8gb"])
def test_plan_published_size_before_download(tmp_path, capsys, profile):
    folder = published_config_folder(tmp_path / "cv3")
    assert main(["plan", "--model", str(folder), "--profile", profile, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    size: dict[str, int] = {}
    for block in plan["blocks"]:
        size[block["submodel"]] = size.get(block["submodel"], 0) + block["bytes"]
    assert set(size) == {"", "flow", "hift"}
    assert 2 * 495e6 < size[""] < 2 * 520e6, size  # CosyVoice3LM ~506M params in bf16 (tied head once)
    assert 2 * 330e6 < size["flow"] < 2 * 335e6, size  # 332.3M: the DiT flow
    assert 4 * 20e6 < size["hift"] < 4 * 21.5e6, size  # 20.8M, kept fp32
    assert plan["peak_vram_bytes"] <= float(profile[:-2]) * 1024**3
    assert main(["plan", "--model", str(folder), "--profile", profile]) == 0
    text = capsys.readouterr().out
    assert "flow_estimator" in text and "hift" in text and "peak" in text.lower()
    assert "1.7 MiB per mel frame" in text  # the streamed flow cache (bf16), which the peak leaves out


# -- the CLI and the runtime on the tiny folder ----------------------------------------------------------
def test_say_clones_a_voice(tiny, prompt, tmp_path):
    out = tmp_path / "cv3.wav"
    assert main(["say", "--model", str(tiny), "--voice", str(prompt), "--voice-text", "A prompt to clone.",
                 "--seed", "3", "--set", "runtime.threads=1", TEXT, "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) > 0 and np.isfinite(audio).all()


def test_modes_put_the_system_prompt_before_endofprompt(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        model = rt.model
        assert model.version is files.V3
        eop = model.tokenizer.endofprompt_id
        assert model.lm.cfg.endofprompt_id == eop  # the LM checks the folder's own marker id
        system = model.tokenizer.encode("You are a helpful assistant.<|endofprompt|>")
        zero_shot = rt.prepare_voice(str(prompt), transcript="A prompt to clone.")[1]
        cross = rt.prepare_voice(str(prompt))[1]
        settings = edge_runtime.models.base.SynthesisSettings(seed=1)
        text_ids, speech = model.lm_prompt(zero_shot, settings)
        assert text_ids[:len(system)] == system and text_ids[len(system):] == zero_shot.tensors["text_ids"].tolist()
        assert speech == zero_shot.tensors["speech_tokens"].tolist()
        assert model.lm_prompt(cross, settings) == (system, [])
        assert model.lm_prompt(None, settings) == (system, [])
        instruct = edge_runtime.models.base.SynthesisSettings(seed=1, instructions="Speak slowly.")
        text_ids, speech = model.lm_prompt(zero_shot, instruct)
        assert speech == [] and text_ids[-1] == eop and text_ids.count(eop) == 1
        assert model.tokenizer.encode("You are a helpful assistant. Speak slowly.<|endofprompt|>") == text_ids
        a = rt.synthesize(TEXT, voice=zero_shot, seed=5)[0]
        b = rt.synthesize(TEXT, voice=zero_shot, seed=5)[0]
        c = rt.synthesize(TEXT, voice=zero_shot, seed=5, instructions="Speak slowly.")[0]
        assert np.array_equal(a, b) and len(a) > 0
        assert not (len(a) == len(c) and np.array_equal(a, c))
        streamed = list(rt.stream(TEXT, voice=cross, seed=6))
        assert all(np.isfinite(chunk).all() for chunk in streamed) and sum(map(len, streamed)) > 0
    finally:
        rt.close()


# -- the server --------------------------------------------------------------------------------------------
def test_server_voice_upload_speech_stream_and_instructions(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        check_server(rt, prompt, TEXT)
    finally:
        rt.close()


# -- every backend gives the resident audio ---------------------------------------------------------------
# A tier too small for the whole tiny model (its activations alone take 5.6 MB): blocks stream.
TINY_TIER = ("memory.vram_gib=0.008", "memory.reserve_gib=0", "offload.keep_resident=[]",
             "batching.max_batch=1", "precision.dtype=fp32", "precision.cpu_decoder_dtype=bf16",
             "runtime.threads=1")


@pytest.fixture(scope="module")
def resident_audio(tiny, prompt):
    rt = edge_runtime.load(str(tiny), profile="cpu", overrides=THREADS)
    try:
        assert rt.placement["backend"] == "resident"
        voice = rt.prepare_voice(str(prompt), transcript="A prompt to clone.")[1]
        # seed 0: the tiny LM speaks ~94 tokens (CosyVoice3's LM may stop early: any of its 200 reserved
        # ids ends speech), three streamed chunks
        return voice, rt.synthesize(TEXT, voice=voice, seed=0)[0], list(rt.stream(TEXT, voice=voice, seed=0))
    finally:
        rt.close()


@pytest.mark.parametrize("backend,target", [("accelerate", "disk"), ("streamer", "disk"), ("deepspeed", "cpu")])
def test_every_backend_gives_the_resident_audio(tiny, resident_audio, backend, target):
    check_backend_equals_resident(tiny, resident_audio, TEXT, 0, TINY_TIER, backend, target)
