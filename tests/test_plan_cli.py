"""`edge-runtime plan` on the embedded voice: table, JSON and exports."""

from __future__ import annotations

import json
import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "plan", *args], capture_output=True, text=True,
                          timeout=300)


def test_plan_table_and_json():
    res = _cli("--profile", "6gb")
    assert res.returncode == 0, res.stderr
    assert "decoder" in res.stdout and "peak VRAM" in res.stdout
    data = json.loads(_cli("--profile", "6gb", "--json").stdout)
    assert data["profile"] == "6gb" and data["dtype"].startswith("bf16")
    placements = {b["component"]: b["placement"] for b in data["blocks"]}
    assert placements == {"text_encoder": "gpu", "duration_predictor": "gpu", "flow": "gpu", "decoder": "gpu"}
    cpu = json.loads(_cli("--profile", "cpu", "--json").stdout)
    assert {b["placement"] for b in cpu["blocks"]} == {"cpu"}


def test_plan_exports(tmp_path):
    out = tmp_path / "map.json"
    res = _cli("--profile", "8gb", "--export", "accelerate", "-o", str(out))
    assert res.returncode == 0, res.stderr
    device_map = json.loads(out.read_text())
    assert set(device_map) == {"text_encoder", "duration_predictor", "flow", "decoder"}
    assert set(device_map.values()) == {0}
    ds = json.loads(_cli("--profile", "6gb", "--export", "deepspeed").stdout)
    assert ds["zero_optimization"]["stage"] == 3


def test_plan_bad_profile_exit_2():
    res = _cli("--profile", "nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr
