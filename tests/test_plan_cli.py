"""`edge-runtime plan` on the embedded voice: table, JSON and exports (in process, via `main(argv)`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from edge_runtime.serving import cli


@pytest.fixture
def run_plan(capsys):
    """`edge-runtime plan ARGS` in this process -> (returncode, stdout, stderr)."""

    def run(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        code = cli.main(["plan", *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def test_plan_table_and_json(run_plan):
    res = run_plan("--profile", "6gb")
    assert res.returncode == 0, res.stderr
    assert "decoder" in res.stdout and "peak VRAM" in res.stdout
    data = json.loads(run_plan("--profile", "6gb", "--json").stdout)
    assert data["profile"] == "6gb" and data["dtype"].startswith("bf16")
    placements = {b["component"]: b["placement"] for b in data["blocks"]}
    assert placements == {"text_encoder": "gpu", "duration_predictor": "gpu", "flow": "gpu", "decoder": "gpu"}
    cpu = json.loads(run_plan("--profile", "cpu", "--json").stdout)
    assert {b["placement"] for b in cpu["blocks"]} == {"cpu"}


def test_plan_exports(tmp_path, run_plan):
    out = tmp_path / "map.json"
    res = run_plan("--profile", "8gb", "--export", "accelerate", "-o", str(out))
    assert res.returncode == 0, res.stderr
    device_map = json.loads(out.read_text())
    assert set(device_map) == {"text_encoder", "duration_predictor", "flow", "decoder"}
    assert set(device_map.values()) == {0}
    ds = json.loads(run_plan("--profile", "6gb", "--export", "deepspeed").stdout)
    assert ds["zero_optimization"]["stage"] == 3


def test_plan_bad_profile_exit_2(run_plan):
    res = run_plan("--profile", "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "unknown profile 'nope'" in res.stderr
