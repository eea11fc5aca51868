"""The hardware probe: real on this machine, and a simulated CUDA GPU through a patched torch.cuda."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from edge_runtime.policy import hardware
from edge_runtime.policy.tiers import select_tier

GIB = 1024 ** 3


def test_probe_this_machine(tmp_path):
    info = hardware.probe(offload_dir=str(tmp_path / "not" / "yet"))
    data = json.loads(json.dumps(info.to_dict()))
    assert data["cpu"]["logical_cores"] >= 1 and data["ram_total_bytes"] > 0
    assert data["disk_path"].endswith("yet") and data["disk_free_bytes"] > 0
    assert data["torch_version"] == torch.__version__


@pytest.fixture
def fake_gpu(monkeypatch):
    props = SimpleNamespace(name="NVIDIA GeForce RTX 3070", total_memory=int(7.78 * GIB), major=8, minor=6,
                            multi_processor_count=46, uuid="abc")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML: free memory comes from torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(7.2 * GIB), props.total_memory))


def test_probe_simulated_gpu(fake_gpu):
    info = hardware.probe()
    gpu = info.gpu
    assert (gpu.name, gpu.compute_capability, gpu.bf16_supported) == ("NVIDIA GeForce RTX 3070", (8, 6), True)
    assert gpu.free_bytes == int(7.2 * GIB)
    json.dumps(info.to_dict())
    assert select_tier(info).name == "8gb"


def test_probe_survives_cuda_errors(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", boom)
    info = hardware.probe()
    assert info.gpus == [] and any("driver too old" in n for n in info.notes)
    assert select_tier(info).name == "cpu"
