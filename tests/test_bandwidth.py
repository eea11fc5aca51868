"""`edge-runtime doctor --bandwidth`: measuring, saving, and the planner's cost model using it.
Small transfers and no wall-clock thresholds: the figures only have to exist and be positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edge_runtime.policy import bandwidth
from edge_runtime.policy.bandwidth import MIB, Bandwidth
from edge_runtime.policy.planner import CostModel


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake(**kw) -> Bandwidth:
    base = dict(device="NVIDIA Test", measured_at="2026-01-02T03:04:05+00:00", size_bytes=MIB, repeats=1,
                h2d_pinned_bytes_per_s=11e9, h2d_pageable_bytes_per_s=6e9, d2h_pinned_bytes_per_s=12e9,
                disk_read_bytes_per_s=3e9, disk_write_bytes_per_s=1e9, disk_cache_dropped=True,
                disk_path="/x", memcpy_bytes_per_s=10e9)
    return Bandwidth(**{**base, **kw})


def test_measure_cpu_small(tmp_path):
    result = bandwidth.measure(4 * MIB, repeats=2, disk_dir=tmp_path / "offload", cuda=False)
    assert result.disk_read_bytes_per_s > 0 and result.disk_write_bytes_per_s > 0
    assert result.memcpy_bytes_per_s > 0
    assert result.h2d_pinned_bytes_per_s is None and result.device == "cpu"
    assert isinstance(result.disk_cache_dropped, bool)
    assert result.disk_path == str(tmp_path / "offload")
    assert list((tmp_path / "offload").iterdir()) == []  # the test file is removed
    rows = dict(result.rows())
    assert rows["host->device, pinned"] == "no CUDA device"
    assert rows["host memory copy"].endswith("GB/s")


def test_measure_rejects_tiny_size():
    with pytest.raises(ValueError):
        bandwidth.measure(1000, cuda=False)


def test_save_load_round_trip(_cache_dir):
    assert bandwidth.load_measured() is None
    result = bandwidth.measure(2 * MIB, repeats=1, cuda=False)
    path = bandwidth.save(result)
    assert path == _cache_dir / "bandwidth.json"
    assert bandwidth.load_measured() == result
    assert [p.name for p in _cache_dir.iterdir() if p.is_file()] == ["bandwidth.json"]  # no temp left
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["measured_at"]


def test_load_measured_tolerates_garbage(_cache_dir):
    _cache_dir.mkdir(parents=True)
    (_cache_dir / "bandwidth.json").write_text("{not json")
    assert bandwidth.load_measured() is None


def test_cost_model_defaults_without_measurement():
    cost, note = bandwidth.cost_model_from_measurement()
    assert cost == CostModel()
    assert "unmeasured" in note and "doctor --bandwidth" in note


def test_cost_model_uses_saved_measurement():
    bandwidth.save(_fake())
    cost, note = bandwidth.cost_model_from_measurement()
    assert cost.h2d_bytes_per_s == 11e9 and cost.disk_bytes_per_s == 3e9
    assert cost.gpu_flops == CostModel().gpu_flops  # the rest stays the default
    assert "measured 2026-01-02" in note and "11.0 GB/s" in note and "NVIDIA Test" in note


def test_cost_model_partial_measurement():
    # CPU-only machine: no H2D figure; a read served from the page cache is not the drive's speed
    cost, note = bandwidth.cost_model_from_measurement(
        _fake(h2d_pinned_bytes_per_s=None, disk_cache_dropped=False), load=False)
    assert cost == CostModel()
    assert "no CUDA device" in note and "page cache" in note
    cost, _ = bandwidth.cost_model_from_measurement(_fake(h2d_pinned_bytes_per_s=None), load=False)
    assert cost.h2d_bytes_per_s == CostModel().h2d_bytes_per_s and cost.disk_bytes_per_s == 3e9


def test_measured_rates_change_streaming_cost():
    slow = CostModel().with_measured_disk(0.5e9)
    assert slow.transfer_s(10 ** 9, "disk") > CostModel().transfer_s(10 ** 9, "disk")
    with pytest.raises(ValueError):
        CostModel().with_measured_disk(0)


def _cli(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGE_RUNTIME_CACHE_DIR": str(cache)}
    env.pop("EDGE_RUNTIME_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_doctor_bandwidth_json(_cache_dir):
    res = _cli("doctor", "--bandwidth", "--bandwidth-mib", "4", "--json", cache=_cache_dir)
    assert res.returncode == 0, res.stderr
    b = json.loads(res.stdout)["bandwidth"]
    assert b["disk_read_bytes_per_s"] > 0 and b["memcpy_bytes_per_s"] > 0
    assert b["saved_to"] == str(_cache_dir / "bandwidth.json")
    assert bandwidth.load_measured() is not None
    table = _cli("doctor", "--bandwidth", "--bandwidth-mib", "4", cache=_cache_dir)
    assert table.returncode == 0, table.stderr
    assert "host memory copy" in table.stdout and "saved to" in table.stdout
    plain = _cli("doctor", "--json", cache=_cache_dir)
    assert "bandwidth" not in json.loads(plain.stdout)


def test_plan_uses_saved_measurement(_cache_dir):
    bandwidth.save(_fake())
    res = _cli("plan", "--profile", "6gb", "--json", cache=_cache_dir)
    assert res.returncode == 0, res.stderr
    cost = json.loads(res.stdout)["cost_model"]
    assert cost["h2d_bytes_per_s"] == 11e9 and cost["disk_bytes_per_s"] == 3e9
    assert "measured 2026-01-02" in cost["note"]
    table = _cli("plan", "--profile", "6gb", cache=_cache_dir)
    assert "cost model: host->device 11.0 GB/s" in table.stdout


@pytest.mark.gpu
def test_cuda_rates_positive(tmp_path):
    result = bandwidth.measure(16 * MIB, repeats=2, disk_dir=tmp_path)
    assert result.device != "cpu"
    assert result.h2d_pinned_bytes_per_s > 0 and result.h2d_pageable_bytes_per_s > 0
    assert result.d2h_pinned_bytes_per_s > 0
