"""CosyVoice2 front ends: text tokenizer, prompt features, ONNX speaker embedding / speech tokenizer,
prepared prompt (edge_runtime.models.cosyvoice.{tokenizer,features,frontend}).

Most tests build their own small folder (upstream's yaml form, a small BPE, ONNX stand-ins with the
official input/output names) and need no reference venv. The tokenizer's special-token ids are
compared with the reference package's own ``get_qwen_tokenizer`` (skipped without .cosyvoice_ref).

The features were checked once against independent implementations (whisper's audio.py with its
mel_filters.npz, torchaudio's compliance/kaldi.py, librosa's mel filters): see the report; here we
pin the properties: frame counts, bins, mean subtraction, dtype.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_support import SCRIPTS, _run, require_reference, tiny_model_dir
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import features as F
from edge_runtime.models.cosyvoice import yaml_config
from edge_runtime.models.cosyvoice.frontend import CosyVoiceFrontend, CosyVoicePrompt, PromptMode
from edge_runtime.models.cosyvoice.tokenizer import ADDED_SPECIAL_TOKENS, ENDOFPROMPT, CosyVoiceTextTokenizer


def _testmodel():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import cosyvoice_testmodel as testmodel
    finally:
        sys.path.remove(str(SCRIPTS))
    return testmodel


def _tone(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speechish(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test signal: a 150 Hz buzz with harmonics, amplitude-modulated, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    buzz = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.15 * buzz * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# -- a small folder: yaml, BPE, ONNX stand-ins --------------------------------------------------------

def _write_bpe(folder: Path) -> None:
    """vocab.json + merges.txt of a small byte-level BPE (no tokenizer_config.json, as allowed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["Hello world, this is a prompt.", "Speak slowly and warmly, please."], trainer)
    tok.model.save(str(folder))


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_campplus(path: Path, input_name: str = "input") -> None:
    """[B,T,80] fbank -> mean over time of its square -> Linear 80->192. (Squared: the fbank is
    mean-subtracted, so a plain time mean would give a zero embedding.)"""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(1).standard_normal((80, 192)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", [input_name, input_name], ["sq"]),
         helper.make_node("ReduceMean", ["sq", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["output"])],
        "campplus_test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    _save_onnx(graph, path)


def _write_speech_tokenizer(path: Path) -> None:
    """[1,128,T] log-mel -> two stride-2 convs (25 Hz, ceil(T/4) tokens) -> argmax over 6561 -> int32;
    feats_length passes through as a second output so that it stays a graph input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    conv = dict(kernel_shape=[3], strides=[2], pads=[1, 1])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["feats", "c1"], ["h1"], **conv),
         helper.make_node("Tanh", ["h1"], ["a1"]),
         helper.make_node("Conv", ["a1", "c2"], ["h2"], **conv),
         helper.make_node("Transpose", ["h2"], ["h2t"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["h2t", "proj"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["idx"], axis=2, keepdims=0),
         helper.make_node("Cast", ["idx"], ["indices"], to=TensorProto.INT32),
         helper.make_node("Identity", ["feats_length"], ["length_out"])],
        "speech_tokenizer_test",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [1, "N"]),
         helper.make_tensor_value_info("length_out", TensorProto.INT32, [1])],
        [numpy_helper.from_array((rng.standard_normal((16, 128, 3)) * 0.05).astype(np.float32), "c1"),
         numpy_helper.from_array((rng.standard_normal((16, 16, 3)) * 0.2).astype(np.float32), "c2"),
         numpy_helper.from_array(rng.standard_normal((16, 6561)).astype(np.float32), "proj")])
    _save_onnx(graph, path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tm = _testmodel()
    d = tmp_path_factory.mktemp("cosyvoice_frontend")
    (d / "cosyvoice2.yaml").write_text(tm.YAML.format(**tm.SIZES["tiny"]), encoding="utf-8")
    _write_bpe(d / "CosyVoice-BlankEN")
    _write_campplus(d / "campplus.onnx")
    _write_speech_tokenizer(d / "speech_tokenizer_v2.onnx")
    return d


@pytest.fixture(scope="module")
def frontend(folder: Path) -> CosyVoiceFrontend:
    return CosyVoiceFrontend(folder, threads=1)


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


# -- features -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [16000, 16159, 16160, 48321])
def test_feature_frame_counts(samples: int) -> None:
    x = _speechish(samples / 16000, 16000)[:samples]
    assert x.size == samples
    w = F.whisper_log_mel(x)
    assert w.shape == (128, samples // 160) and w.dtype == torch.float32
    fb = F.speaker_fbank(x)
    assert fb.shape == (1 + (samples - 400) // 160, 80) and fb.dtype == torch.float32
    x24 = _speechish(samples * 1.5 / 24000, 24000)
    mel = F.prompt_mel(x24)
    assert mel.shape == (x24.size // 480, 80) and mel.dtype == torch.float32


def test_whisper_log_mel_range_and_tone_bin() -> None:
    # centre of slaney mel filter k (0..127) over 0..8 kHz; pick one near 1.5 kHz and play it
    def slaney_mel(f): return f / (200 / 3) if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)
    def slaney_hz(m): return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)
    centres = [slaney_hz(slaney_mel(8000) * (k + 1) / 129) for k in range(128)]
    k = min(range(128), key=lambda i: abs(centres[i] - 1500))
    w = F.whisper_log_mel(_tone(centres[k], 1.0, 16000))
    assert abs(int(w.mean(dim=1).argmax()) - k) <= 1
    # log10 clamped 8 below the peak, then (x + 4) / 4: a span of at most 2
    assert float(w.max() - w.min()) <= 2.0 + 1e-6 and float(w.max() - w.min()) > 1.0


def test_speaker_fbank_mean_subtracted_and_tone_bin() -> None:
    # Kaldi bins: triangles on 1127 ln(1 + f/700) from 20 Hz to 8 kHz; the tone starts halfway, so
    # after mean subtraction the second half peaks at the tone's bin
    def mel(f): return 1127 * math.log(1 + f / 700)
    lo, hi = mel(20), mel(8000)
    k = 40
    centre_hz = 700 * (math.exp((lo + (k + 1) * (hi - lo) / 81) / 1127) - 1)
    x = np.concatenate([_tone(centre_hz, 1.0, 16000, amp=1e-3), _tone(centre_hz, 1.0, 16000)])
    fb = F.speaker_fbank(x)
    assert torch.allclose(fb.mean(dim=0), torch.zeros(80), atol=1e-5)
    assert int(fb[-50:].mean(dim=0).argmax()) == k
    assert float(fb.abs().max()) > 1.0  # not a trivially flat feature


def test_prompt_mel_tone_bin_and_config_from_yaml(folder: Path) -> None:
    cfg = F.PromptMelConfig.from_yaml(yaml_config.load(folder / "cosyvoice2.yaml"))
    assert cfg == F.PromptMelConfig()  # the yaml holds the published numbers
    numbers = (cfg.n_fft, cfg.hop_size, cfg.win_size, cfg.num_mels, cfg.fmax, cfg.center)
    assert numbers == (1920, 480, 1920, 80, 8000.0, False)
    custom = F.PromptMelConfig.from_yaml({"sample_rate": 22050, "feat_extractor": {"fmax": None, "hop_size": 256}})
    assert (custom.sampling_rate, custom.fmax, custom.hop_size, custom.n_fft) == (22050, None, 256, 1920)
    # a 2 kHz tone: the loudest bin is the slaney filter whose centre is nearest 2 kHz
    def slaney_mel(f): return f / (200 / 3) if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)
    def slaney_hz(m): return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)
    centres = [slaney_hz(slaney_mel(8000) * (k + 1) / 81) for k in range(80)]
    k = min(range(80), key=lambda i: abs(centres[i] - 2000))
    mel = F.prompt_mel(_tone(centres[k], 1.0, 24000), cfg)
    assert int(mel.mean(dim=0).argmax()) == k
    assert float(mel.min()) >= math.log(1e-5) - 1e-6


# -- text tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_adds_cosyvoice_special_tokens(folder: Path) -> None:
    tok = CosyVoiceTextTokenizer(folder / "CosyVoice-BlankEN")
    ids = [tok.encode(t) for t in ADDED_SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert flat == sorted(flat) and len(set(flat)) == 19  # appended in upstream's order
    assert tok.endofprompt_id == tok.encode(ENDOFPROMPT)[0] and max(flat) < len(tok)
    text = tok.encode("Hello world")
    laughter = tok.encode("[laughter]")[0]
    assert tok.encode("Hello world" + ENDOFPROMPT + "[laughter]") == text + [tok.endofprompt_id, laughter]


def test_tokenizer_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"lacks merges\.txt"):
        bad = tmp_path / "no_merges"
        bad.mkdir()
        shutil.copy(folder / "CosyVoice-BlankEN" / "vocab.json", bad)
        CosyVoiceTextTokenizer(bad)
    broken = tmp_path / "broken"
    shutil.copytree(folder / "CosyVoice-BlankEN", broken)
    (broken / "vocab.json").write_text('{"a": ', encoding="utf-8")
    with pytest.raises(InvalidInputError, match="cannot read the Qwen2 tokenizer in .*broken"):
        CosyVoiceTextTokenizer(broken)
    with pytest.raises(InvalidInputError, match="must be a string"):
        CosyVoiceTextTokenizer(folder / "CosyVoice-BlankEN").encode(None)  # type: ignore[arg-type]


REF_TOKENIZER = r"""
import json, sys, types
# the reference's tokenizer module imports whisper's and tiktoken's tokenizers for CosyVoice1 only
for name in ("whisper", "whisper.tokenizer", "tiktoken"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["whisper.tokenizer"].Tokenizer = object
from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer
tok = get_qwen_tokenizer(sys.argv[1], skip_special_tokens=True)
texts = json.loads(sys.argv[2])
print(json.dumps([tok.encode(t, allowed_special="all") for t in texts]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_config", [True, False], ids=["tokenizer_config", "vocab_merges_only"])
def test_tokenizer_ids_match_reference(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                       with_config: bool) -> None:
    py = require_reference()
    blank = tiny_model_dir(tmp_path_factory) / "CosyVoice-BlankEN"
    if not with_config:  # as a folder with only vocab.json + merges.txt
        only = tmp_path / "blank"
        only.mkdir()
        for name in ("vocab.json", "merges.txt", "config.json"):
            shutil.copy(blank / name, only)
        blank = only
    texts = [*ADDED_SPECIAL_TOKENS, "<|endoftext|>", "Hello world, the quick brown fox.",
             "Speak slowly.<|endofprompt|>Hello [laughter] world [breath] 123!"]
    ref = json.loads(_run([str(py), "-c", REF_TOKENIZER, str(blank), json.dumps(texts)]).strip().splitlines()[-1])
    ours = CosyVoiceTextTokenizer(blank)
    got = [ours.encode(t) for t in texts]
    print(f"special ids: {[g[0] for g in got[:19]]}")
    assert got == ref
    assert ours.endofprompt_id == ref[2][0]


# -- prepared prompt -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,seconds", [(16000, 1.03), (24000, 2.5), (44100, 1.7)])
def test_prepare_prompt_shapes(frontend: CosyVoiceFrontend, rate: int, seconds: float) -> None:
    audio = _speechish(seconds, rate)
    prompt = frontend.prepare_prompt(audio, rate, "  Hello world, this is a prompt. ")
    n = prompt.speech_tokens.numel()
    # the stand-in gives ceil(frames/4) tokens, the mel 50 frames/s: both cut to the shorter duration
    whisper_frames = int(round(seconds * 16000)) // 160
    mel_frames = int(round(seconds * 24000)) // 480
    assert n == min(math.ceil(whisper_frames / 4), mel_frames // 2) >= 25
    assert prompt.prompt_feat.shape == (2 * n, 80) and prompt.prompt_feat.dtype == torch.float32
    assert prompt.speech_tokens.dtype == torch.int32 and 0 <= int(prompt.speech_tokens.min())
    assert int(prompt.speech_tokens.max()) < 6561 and len(set(prompt.speech_tokens.tolist())) > 1
    assert prompt.embedding.shape == (192,) and prompt.embedding.dtype == torch.float32
    assert float(prompt.embedding.abs().max()) > 1e-2  # a real (non-zero) embedding
    assert prompt.text_ids.tolist() == frontend.tokenizer.encode("Hello world, this is a prompt.")
    assert prompt.mode is PromptMode.ZERO_SHOT
    expected = 4 * n + 4 * 2 * n * 80 + 4 * 192 + 4 * prompt.text_ids.numel()
    assert prompt.nbytes == expected
    assert prompt.prompt_feat.untyped_storage().nbytes() == 4 * 2 * n * 80  # the cut-off rows are freed


def test_prepare_prompt_reuses_sessions_and_is_deterministic(frontend: CosyVoiceFrontend) -> None:
    audio = _speechish(1.5, 16000, seed=3)
    a = frontend.prepare_prompt(audio, 16000)
    speaker, tokenizer = frontend._speaker, frontend._speech_tokenizer
    b = frontend.prepare_prompt(audio.astype(np.float64)[:, None], 16000)  # [T, 1] float64 is fine too
    assert frontend._speaker is speaker and frontend._speech_tokenizer is tokenizer
    assert torch.equal(a.speech_tokens, b.speech_tokens) and torch.equal(a.prompt_feat, b.prompt_feat)
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)


def test_prompt_modes_and_lm_prompt(frontend: CosyVoiceFrontend) -> None:
    audio = _speechish(1.2, 16000)
    zero = frontend.prepare_prompt(audio, 16000, "Hello world")
    cross = frontend.prepare_prompt(audio, 16000, None)
    blank = frontend.prepare_prompt(audio, 16000, "   ")
    assert cross.mode is blank.mode is PromptMode.CROSS_LINGUAL and cross.text_ids is None
    assert cross.nbytes == zero.nbytes - 4 * zero.text_ids.numel()

    lm = zero.lm_prompt()
    assert torch.equal(lm.text_ids, zero.text_ids) and torch.equal(lm.speech_tokens, zero.speech_tokens)
    for lm in (cross.lm_prompt(), zero.lm_prompt("cross_lingual")):
        assert lm.text_ids.numel() == 0 and lm.speech_tokens.numel() == 0
    ids = frontend.instruction_ids(" Speak slowly. ")
    assert ids == frontend.tokenizer.encode("Speak slowly.") + [frontend.tokenizer.endofprompt_id]
    for lm in (zero.lm_prompt(instruction_ids=ids), cross.lm_prompt(PromptMode.INSTRUCT, ids)):
        assert lm.text_ids.tolist() == ids and lm.speech_tokens.numel() == 0

    with pytest.raises(InvalidInputError, match="zero-shot mode needs the prompt's transcript"):
        cross.lm_prompt(PromptMode.ZERO_SHOT)
    with pytest.raises(InvalidInputError, match="instruct mode needs instruction text"):
        zero.lm_prompt(PromptMode.INSTRUCT)
    with pytest.raises(InvalidInputError, match="'monologue' is not one of zero_shot, cross_lingual, instruct"):
        zero.lm_prompt("monologue")
    with pytest.raises(InvalidInputError, match="instruction must be non-empty"):
        frontend.instruction_ids("  ")


def test_prompt_tensors_round_trip(frontend: CosyVoiceFrontend) -> None:
    prompt = frontend.prepare_prompt(_speechish(1.0, 16000), 16000, "Hello")
    stored = {k: v.numpy() for k, v in prompt.tensors().items()}
    back = CosyVoicePrompt.from_tensors(stored)
    assert back.mode is PromptMode.ZERO_SHOT and back.nbytes == prompt.nbytes
    for name, t in prompt.tensors().items():
        assert torch.equal(back.tensors()[name], t)
    with pytest.raises(InvalidInputError, match="lacks 'embedding'"):
        CosyVoicePrompt.from_tensors({k: v for k, v in stored.items() if k != "embedding"})
    with pytest.raises(InvalidInputError, match=r"prompt_feat \[7, 80\] for 25 speech tokens"):
        CosyVoicePrompt.from_tensors({**stored, "prompt_feat": np.zeros((7, 80), np.float32)})


@pytest.mark.parametrize("audio,rate,message", [
    (np.zeros(16000 * 31, np.float32) + 0.1, 16000, r"31\.0 s long; at most 30 s"),
    (_speechish(0.1, 16000), 16000, r"0\.100 s long; at least 0\.2 s"),
    (np.zeros(16000, np.float32), 16000, r"silent: RMS -inf dBFS, below the -60 dBFS"),
    (_speechish(1.0, 16000) * 1e-3, 16000, r"silent: RMS -\d+\.\d dBFS"),
    (np.where(np.arange(16000) == 5, np.nan, 0.1).astype(np.float32), 16000, r"1 non-finite samples .* index 5"),
    (np.full(16000, np.inf, np.float32), 16000, "16000 non-finite samples"),
    ((_speechish(1.0, 16000) * 32767).astype(np.int16), 16000, "float samples in .* dtype int16"),
    (_speechish(1.0, 16000) * 32767, 16000, r"peaks at \d+.*\(integer PCM divided by 32768\)"),
    (np.stack([_speechish(1.0, 16000)] * 2), 16000, r"mono \[samples\], got shape \[2, 16000\]"),
    (_speechish(1.0, 8000), 8000, "sample_rate 8000 Hz is outside 16000..192000 Hz"),
    (_speechish(1.0, 16000), 16000.0, "sample_rate must be an integer"),
])
def test_prepare_prompt_rejects_bad_audio(frontend: CosyVoiceFrontend, audio, rate, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        frontend.prepare_prompt(audio, rate, "hello")


def test_prepare_prompt_needs_one_token(frontend: CosyVoiceFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frontend, "speech_tokens", lambda audio: torch.zeros(0, dtype=torch.int32))
    with pytest.raises(InvalidInputError, match=r"gave 0 speech tokens and 50 mel frames; at least 1 token"):
        frontend.prepare_prompt(_speechish(1.0, 16000), 16000)


def test_onnx_file_errors(folder: Path, tmp_path: Path) -> None:
    audio = _speechish(1.0, 16000)
    d = _copy(folder, tmp_path)
    (d / "campplus.onnx").unlink()
    fe = CosyVoiceFrontend(d)  # sessions open lazily: construction does not need the files
    with pytest.raises(InvalidInputError, match=rf"campplus\.onnx is missing from {re.escape(str(d))}"):
        fe.prepare_prompt(audio, 16000)

    _write_campplus(d / "campplus.onnx", input_name="fbank")
    with pytest.raises(InvalidInputError,
                       match=r"campplus\.onnx has inputs \['fbank'\] and outputs \['output'\]; "
                             r"expected inputs \['input'\]"):
        CosyVoiceFrontend(d).prepare_prompt(audio, 16000)

    (d / "speech_tokenizer_v2.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(InvalidInputError, match=r"speech_tokenizer_v2\.onnx is not a loadable ONNX model"):
        CosyVoiceFrontend(d).speech_tokens(audio)


def test_missing_yaml_and_tokenizer(folder: Path, tmp_path: Path) -> None:
    d = _copy(folder, tmp_path)
    (d / "cosyvoice2.yaml").unlink()
    with pytest.raises(InvalidInputError, match=rf"cannot read cosyvoice2\.yaml in {re.escape(str(d))}"):
        CosyVoiceFrontend(d)
    shutil.rmtree(d / "CosyVoice-BlankEN")
    fe = CosyVoiceFrontend(d, yaml_config.load(folder / "cosyvoice2.yaml"))
    assert fe.prepare_prompt(_speechish(1.0, 16000), 16000).mode is PromptMode.CROSS_LINGUAL  # no tokenizer needed
    with pytest.raises(InvalidInputError, match=r"CosyVoice-BlankEN lacks vocab\.json, merges\.txt"):
        fe.prepare_prompt(_speechish(1.0, 16000), 16000, "hello")


@pytest.mark.slow
def test_official_standins_from_testmodel(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny folder scripts/cosyvoice_testmodel.py writes (its stand-ins, its BlankEN) prepares."""
    d = tiny_model_dir(tmp_path_factory)
    prompt = CosyVoiceFrontend(d, threads=1).prepare_prompt(_speechish(2.0, 16000), 16000, "Hello world")
    n = prompt.speech_tokens.numel()
    assert n == 50 and prompt.prompt_feat.shape == (100, 80) and prompt.embedding.shape == (192,)
    assert prompt.text_ids.numel() > 0
