"""Where transformers models come from: a hub id in the local Hugging Face cache (offline), never a
download without --allow-download, clear errors naming where we looked; the CLI on such a model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from hf_tiny_pocket_tts import build_tiny_pocket_tts

HUB_ID = "edge-tests/tiny-pocket-tts"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache holding HUB_ID in the hub's own layout (refs/main -> snapshots/<commit>)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    build_tiny_pocket_tts(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def run_cli(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """The CLI as a user starts it, HF_HUB_CACHE in its environment (one smoke test)."""
    environ = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=600, env=environ)


@pytest.fixture
def cli(monkeypatch, capsys):
    """The CLI in this process, the hub cache pointed at ``cache`` (huggingface_hub reads its
    constant at call time) and ``env`` set: -> (returncode, stdout, stderr)."""
    from huggingface_hub import constants

    from edge_runtime.serving.cli import main

    def run(*args: str, cache: Path, **env: str) -> SimpleNamespace:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def test_hub_id_from_local_cache_offline(hub_cache, tmp_path):
    out = tmp_path / "hub.wav"
    res = run_cli("say", "--model", HUB_ID, "--set", "runtime.threads=1", "Hello from the cache.", "-o", str(out),
                  cache=hub_cache, HF_HUB_OFFLINE="1")
    assert res.returncode == 0, res.stderr
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) > 0 and np.isfinite(audio).all()


def test_missing_hub_id_says_where_and_how(hub_cache, cli):
    res = cli("say", "--model", "edge-tests/not-there", "Hi.", "-o", "/dev/null", cache=hub_cache)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(hub_cache) in res.stderr and "hf download edge-tests/not-there" in res.stderr
    assert "--allow-download" in res.stderr
    res = cli("say", "--model", "edge-tests/not-there", "--allow-download", "Hi.", "-o", "/dev/null",
                  cache=hub_cache, HF_HUB_OFFLINE="1")
    assert res.returncode == 2 and "HF_HUB_OFFLINE is set" in res.stderr


def test_cli_clones_a_voice_and_plans(hub_cache, tmp_path, cli):
    folder = hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT
    t = np.arange(48000) / 48000.0
    prompt = tmp_path / "prompt.flac"  # any format soundfile reads, at any rate: resampled
    sf.write(prompt, (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             48000)
    out = tmp_path / "cloned.wav"
    res = cli("say", "--model", str(folder), "--voice", str(prompt), "--voice-text", "A test.",
              "--set", "runtime.threads=1", "Cloned.", "-o", str(out), cache=hub_cache)
    assert res.returncode == 0, res.stderr
    assert sf.info(out).frames > 0
    res = cli("plan", "--model", str(folder), "--profile", "8gb", "--json", cache=hub_cache)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert {b["component"] for b in plan["blocks"]} >= {"decoder", "flow_head"}


def test_model_folder_without_weights(hub_cache, tmp_path, cli):
    folder = tmp_path / "broken"
    shutil.copytree(hub_cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT, folder)
    (folder / "model.safetensors").unlink()
    res = cli("say", "--model", str(folder), "Hi.", "-o", "/dev/null", cache=hub_cache)
    assert res.returncode == 2 and "lacks model.safetensors" in res.stderr and "Traceback" not in res.stderr
