"""Backends on a small random model saved with safetensors: each places blocks as the plan says
and computes exactly what the resident model computes. CPU execution device here; the GPU run of
the same code paths is in test_backends_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_runtime.runtime.backends import BackendError, LoadRequest, load_model
from edge_runtime.runtime.backends.checkpoint import Checkpoint
from offload_models import TinyStack, plan_for, save_random

SHAPE = dict(vocab=256, hidden=128, ffn=512, layers=6)
CPU = torch.device("cpu")
HOOKED = ("accelerate", "streamer")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = save_random(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", **SHAPE)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SHAPE["vocab"], (2, 24), generator=torch.Generator().manual_seed(1))


def reference(path: Path, ids, dtype=torch.float32) -> torch.Tensor:
    """The plain PyTorch model, weights loaded with load_state_dict: what every backend must equal."""
    from safetensors.torch import load_file

    model = TinyStack(**SHAPE)
    model.load_state_dict(load_file(str(path)))
    model = model.to(dtype).eval()
    model.scale = model.scale.float()  # backends keep constructor-made fp32 buffers fp32
    with torch.inference_mode():
        return model(ids)


def run(backend, path, plan, ids, dtype=torch.float32, **kw):
    request = LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=path, plan=plan, device=CPU,
                          dtype=dtype, **kw)
    loaded = load_model(request, backend)
    try:
        with torch.inference_mode():
            first = loaded.model(ids)
            second = loaded.model(ids)
        return first, second, loaded
    finally:
        loaded.close()


@pytest.mark.parametrize("target", ["disk", "cpu"])
@pytest.mark.parametrize("backend", ["resident", *HOOKED])
def test_fp32_bit_identical(backend, target, checkpoint, ids):
    plan = plan_for(SHAPE, 0.3, target=target)
    streamed = [b for b in plan.blocks if b.placement == f"stream:{target}"]
    assert len(streamed) >= 3, plan.table()
    first, second, loaded = run(backend, checkpoint, plan, ids)
    expected = reference(checkpoint, ids)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    if backend in HOOKED and target == "disk":
        # every streamed block's weights were read once per forward, nothing more
        assert loaded.stats.loads == 2 * len(streamed)
        assert loaded.stats.bytes_moved == 2 * sum(b.bytes for b in streamed)


def test_every_block_streamed(checkpoint, ids):
    plan = plan_for(SHAPE, 0.0)
    assert [b.placement for b in plan.blocks if b.component == "blocks"] == ["stream:disk"] * SHAPE["layers"]
    for backend in HOOKED:
        first, _, _ = run(backend, checkpoint, plan, ids)
        assert torch.equal(first, reference(checkpoint, ids))


def test_bf16_same_across_backends_and_close_to_fp32(checkpoint, ids, tmp_path):
    plan = plan_for(SHAPE, 0.3, dtype=torch.bfloat16)
    outs = {b: run(b, checkpoint, plan, ids, torch.bfloat16, offload_dir=tmp_path)[0]
            for b in ("resident", *HOOKED)}
    # the same bf16 weights and kernels: backends agree exactly with each other...
    assert torch.equal(outs["resident"], outs["accelerate"])
    assert torch.equal(outs["resident"], outs["streamer"])
    assert torch.equal(outs["resident"], reference(checkpoint, ids, torch.bfloat16))
    # ...and bf16 (8-bit mantissa, ~3 significant digits) stays within 3% of fp32's logit range
    fp32 = reference(checkpoint, ids)
    err = (outs["streamer"].float() - fp32).abs().max() / fp32.abs().max()
    assert err < 0.03, float(err)
    # the streamer maps a converted bf16 copy of the streamed blocks, written once
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_fp32_modules_stay_fp32(checkpoint, ids):
    plan = plan_for(SHAPE, 0.3, dtype=torch.bfloat16)
    request = LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=checkpoint, plan=plan, device=CPU,
                          dtype=torch.bfloat16, fp32_modules=("head",))
    loaded = load_model(request, "resident")
    assert loaded.model.head.weight.dtype == torch.float32
    assert loaded.model.blocks[0].up.weight.dtype == torch.bfloat16
    assert loaded.model.scale.dtype == torch.float32
    loaded.close()


class Repeating(TinyStack):
    """Calls its last block several times per forward, like a vocoder decoding chunk by chunk."""

    def forward(self, ids):
        x = self.embed(ids) * self.scale
        for block in self.blocks:
            x = block(x)
        for _ in range(3):
            x = self.blocks[-1](x)
        return self.head(self.norm(x))


def test_streamer_learns_order_and_bounds_memory(checkpoint, ids):
    plan = plan_for(SHAPE, 0.0)
    request = LoadRequest(build=lambda: Repeating(**SHAPE), checkpoint=checkpoint, plan=plan, device=CPU,
                          dtype=torch.float32)
    loaded = load_model(request, "streamer")
    streamer = loaded.runtime_state
    held = []
    for block in loaded.model.blocks:  # at each block start: how many streamed blocks hold memory
        block.register_forward_pre_hook(lambda *_: held.append(len(streamer.active) + len(streamer.inflight)))
    with torch.inference_mode():
        loaded.model(ids)
        loaded.stats.reset()
        out = loaded.model(ids)
    # after one pass the repeated block is known to follow itself: loaded once, not four times
    assert streamer.repeats == {f"blocks.{SHAPE['layers'] - 1}"}
    assert streamer.next_of[f"blocks.{SHAPE['layers'] - 1}"] == "blocks.0"  # the next request
    assert loaded.stats.loads == SHAPE["layers"]
    assert max(held) <= 1 + plan.prefetch + 1  # current + prefetched (+ the one being installed)
    expected_model = Repeating(**SHAPE)
    from safetensors.torch import load_file

    expected_model.load_state_dict(load_file(str(checkpoint)))
    with torch.inference_mode():
        assert torch.equal(out, expected_model.eval()(ids))
    loaded.end_request()  # the repeating block is not kept between requests
    assert f"blocks.{SHAPE['layers'] - 1}" not in streamer.active
    loaded.close()
    assert all(p.device.type == "meta" for p in loaded.model.blocks[0].parameters())


def test_checkpoint_maps_without_copy(checkpoint):
    ckpt = Checkpoint(checkpoint)
    name = "blocks.0.up.weight"
    mapped = ckpt.map([name])[name]
    assert torch.equal(mapped, ckpt.read(name))
    # a view of the file: its storage is the mapping, not a private allocation of the tensor's size
    assert mapped.untyped_storage().nbytes() >= mapped.numel() * 4


def test_bad_checkpoints(tmp_path, ids):
    plan = plan_for(SHAPE, 0.3)
    with pytest.raises(BackendError, match="does not exist"):
        run("streamer", tmp_path / "missing.safetensors", plan, ids)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BackendError, match="not a readable safetensors"):
        run("accelerate", junk, plan, ids)
    other, _ = save_random(tmp_path / "other.safetensors", vocab=256, hidden=128, ffn=512, layers=2)
    with pytest.raises(BackendError, match="lacks"):
        run("resident", other, plan, ids)


def test_unwritable_offload_dir(checkpoint, ids, tmp_path):
    plan = plan_for(SHAPE, 0.3, dtype=torch.bfloat16)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BackendError, match="offload folder .* cannot be created"):
        run("streamer", checkpoint, plan, ids, torch.bfloat16, offload_dir=blocker / "sub")


def test_unknown_backend(checkpoint, ids):
    with pytest.raises(BackendError, match="unknown backend 'magic'"):
        run("magic", checkpoint, plan_for(SHAPE, 0.3), ids)


PEAK_RSS = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from offload_models import TinyStack, plan_for
from edge_runtime.runtime.backends import LoadRequest, load_model
from edge_runtime.runtime.memory import peak_rss_bytes
shape = json.loads({shape!r})
plan = plan_for(shape, 0.0)
loaded = load_model(LoadRequest(build=lambda: TinyStack(**shape), checkpoint={path!r}, plan=plan,
                                device=torch.device("cpu"), dtype=torch.float32), {backend!r})
with torch.inference_mode():
    loaded.model(torch.zeros(1, 8, dtype=torch.long))
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's (pytest's) peak
print(peak_rss_bytes())
"""


def peak_rss(backend: str, path: Path, shape: dict) -> int:
    code = PEAK_RSS.format(tests=str(Path(__file__).parent), shape=json.dumps(shape), path=str(path),
                           backend=backend)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_disk_offload_peak_rss_below_resident(tmp_path):
    shape = dict(vocab=256, hidden=1024, ffn=4096, layers=8)  # 8 blocks of 32 MiB: 256 MiB fp32
    path, _ = save_random(tmp_path / "big.safetensors", **shape)
    model_bytes = path.stat().st_size
    resident = peak_rss("resident", path, shape)
    for backend in HOOKED:
        streamed = peak_rss(backend, path, shape)
        # streaming holds ~2 blocks of 8 at a time: at least half the model less than resident
        # streaming holds ~2 blocks of 8 at a time: at least half the model less than resident
        assert streamed < resident - model_bytes // 2, (backend, streamed, resident, model_bytes)


def test_accelerate_with_its_own_device_map(checkpoint, ids):
    """options.device_map="infer": accelerate's infer_auto_device_map, max_memory from the budget,
    no-split blocks kept whole; the overflow goes to disk and outputs stay exact."""
    plan = plan_for(SHAPE, 0.3)
    request = LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=checkpoint, plan=plan, device=CPU,
                          dtype=torch.float32, no_split_modules=("Block",), options={"device_map": "infer"})
    loaded = load_model(request, "accelerate")
    with torch.inference_mode():
        out = loaded.model(ids)
    assert torch.equal(out, reference(checkpoint, ids))
    assert loaded.stats.loads >= 1 and loaded.stats.bytes_moved > 0
    # whole blocks only: no key names a part of a Block
    dmap = loaded.details["device_map"]
    disk = [k for k, v in dmap.items() if v == "disk"]
    assert disk and all(not k.startswith("blocks.") or k.count(".") == 1 for k in dmap)
    loaded.close()
    with pytest.raises(BackendError, match="device_map must be 'plan' or 'infer'"):
        load_model(LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=checkpoint, plan=plan, device=CPU,
                               dtype=torch.float32, options={"device_map": "guess"}), "accelerate")
