"""The same backends on a CUDA device: weights streamed from pinned host RAM over PCIe. Skipped
without CUDA (the CPU tests in test_backends.py walk the same code on the CPU device)."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.runtime.backends import LoadRequest, load_model
from offload_models import TinyStack, plan_for, save_random

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SHAPE = dict(vocab=256, hidden=1024, ffn=4096, layers=8)  # 8 x 32 MiB blocks in fp32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random(tmp_path_factory.mktemp("gpu") / "stack.safetensors", **SHAPE)[0]


def run(backend, path, plan, dtype=torch.float32):
    cuda = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=path, plan=plan, device=cuda,
                                    dtype=dtype), backend)
    ids = torch.randint(0, SHAPE["vocab"], (1, 64), generator=torch.Generator().manual_seed(0)).to(cuda)
    with torch.inference_mode():
        loaded.model(ids)
        loaded.stats.reset()
        out = loaded.model(ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    result = (out.float().cpu(), peak, loaded.stats.bytes_moved, loaded)
    loaded.close()
    return result


@pytest.mark.parametrize("backend", ["accelerate", "streamer"])
def test_streamed_from_pinned_ram_equals_resident(backend, checkpoint):
    plan = plan_for(SHAPE, 0.0, target="cpu")
    ref, ref_peak, _, _ = run("resident", checkpoint, plan)
    out, peak, moved, loaded = run(backend, checkpoint, plan)
    assert torch.equal(out, ref)
    streamed = sum(b.bytes for b in plan.blocks if b.placement == "stream:cpu")
    assert moved == streamed
    # resident holds every block; streaming at most 1 + prefetch of them
    assert peak < ref_peak - streamed // 2, (peak, ref_peak)
    if backend == "streamer":
        host = next(iter(loaded.runtime_state.blocks.values())).host
        assert all(t.is_pinned() for t in host.values())


def test_bf16_streamer_matches_resident(checkpoint):
    plan = plan_for(SHAPE, 0.3, target="cpu", dtype=torch.bfloat16)
    ref = run("resident", checkpoint, plan, torch.bfloat16)[0]
    assert torch.equal(run("streamer", checkpoint, plan, torch.bfloat16)[0], ref)


def test_deepspeed_zero3_on_gpu(checkpoint):
    pytest.importorskip("deepspeed")
    plan = plan_for(SHAPE, 0.0, target="cpu")
    ref = run("resident", checkpoint, plan)[0]
    out, peak, moved, _ = run("deepspeed", checkpoint, plan)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4) and moved > 0
