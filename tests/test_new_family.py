"""A family added from ONE module of the test tree (family_toy.py): a sharded-safetensors LM, a
torch.save'd vocoder and a processor-held codec, planned in one budget; `plan`, `say`, `serve` and
every backend work for it with no edit to any other module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import edge_runtime
from edge_runtime.serving.cli import main
from family_toy import build_toy  # registers the family in this process

TESTS = Path(__file__).resolve().parent
# A GPU tier that holds the LM's head and the small parts: the LM's AR layers compute on the CPU,
# the vocoder's bulk (from the .pt state dict) streams; run on this machine's execution device.
TOY_TIER = ("memory.vram_gib=0.0002", "memory.reserve_gib=0", "offload.keep_resident=[]",
            "batching.max_batch=1", "precision.dtype=fp32")
TEXT = "Hello there. A second sentence."


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return build_toy(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> Path:
    t = np.arange(16000) / 16000
    path = tmp_path_factory.mktemp("prompt") / "me.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def resident(toy, prompt):
    """(audio, audio with the cloned voice) from the cpu profile: everything resident."""
    rt = edge_runtime.load(str(toy), profile="cpu", overrides=("runtime.threads=1",))
    try:
        assert rt.placement["backend"] == "resident"
        return rt.synthesize(TEXT)[0], rt.synthesize(TEXT, voice=str(prompt))[0]
    finally:
        rt.close()


def plan_json(toy: Path, capsys, *sets: str) -> dict:
    assert main(["plan", "--model", str(toy), "--profile", "6gb", *[a for s in sets for a in ("--set", s)],
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_covers_every_submodel_in_one_budget(toy, capsys):
    plan = plan_json(toy, capsys, *TOY_TIER, "offload.target=disk")
    by_part: dict[str, list] = {}
    for block in plan["blocks"]:
        by_part.setdefault(block["submodel"], []).append(block)
    assert set(by_part) == {"", "vocoder", "codec"}
    assert {b["placement"] for b in by_part["vocoder"]} >= {"stream:disk"}  # the .pt's bulk streams
    assert {b["placement"] for b in by_part[""] if b["autoregressive"]} >= {"cpu"}  # AR: computed, not streamed
    codec = by_part["codec"][0]
    assert codec["name"] == "codec:" and codec["placement"] == "gpu"
    assert plan["peak_vram_bytes"] <= 0.0002 * 1024**3  # all three in the one budget


@pytest.mark.parametrize("backend,target", [("accelerate", "disk"), ("accelerate", "cpu"), ("streamer", "disk"),
                                            ("streamer", "cpu"), ("deepspeed", "cpu")])
def test_every_backend_gives_the_resident_audio(toy, prompt, resident, backend, target):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    rt = edge_runtime.load(str(toy), profile="6gb", overrides=(*TOY_TIER, f"offload.target={target}",
                                                              f"offload.backend={backend}", "runtime.threads=1"))
    try:
        placed = rt.placement
        assert placed["backend"] == backend and placed["streamed_bytes"] > 0
        assert set(placed["parts"]) == {"model", "vocoder", "codec"}
        plain, cloned = resident
        assert np.array_equal(rt.synthesize(TEXT)[0], plain)
        assert np.array_equal(rt.synthesize(TEXT, voice=str(prompt))[0], cloned)
        assert not np.array_equal(plain, cloned)  # the codec's speaker vector reached the LM
        if target == "disk":  # stream:cpu on a CPU device moves nothing
            assert rt.placement["bytes_moved"] > 0
        if backend == "deepspeed":  # ZeRO-3 partitions only parameters above its persistence threshold
            assert placed["parts"]["vocoder"]["mode"] == "zero3"
    finally:
        rt.close()


def test_say_clones_a_voice(toy, prompt, tmp_path, capsys):
    out = tmp_path / "toy.wav"
    assert main(["say", "--model", str(toy), "--voice", str(prompt), "--set", "runtime.threads=1", TEXT,
                 "-o", str(out)]) == 0
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) > 0 and np.isfinite(audio).all()


def test_serve_from_a_plugin_module(toy):
    """A real server process finds the family through EDGE_RUNTIME_FAMILIES, as a user's plug-in."""
    openai = pytest.importorskip("openai")
    env = {**os.environ, "EDGE_RUNTIME_FAMILIES": "family_toy",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--model", str(toy), "--port", "0",
                             "--profile", "cpu", "--no-warm-up", "--set", "runtime.threads=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        startup = ""
        for line in proc.stdout:
            startup += line
            if line.startswith("serving on "):
                break
        url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", startup)
        assert url, startup
        client = openai.OpenAI(base_url=f"{url.group(1)}/v1", api_key="none", max_retries=0)
        speech = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav")
        audio, rate = sf.read(__import__("io").BytesIO(speech.content))
        assert rate == 16000 and len(audio) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_an_unknown_folder_names_the_families(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NotATTSModel"], "model_type": "nope"}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "NotATTSModel" in err and "toy_tts" in err and "piper" in err and "Traceback" not in err
