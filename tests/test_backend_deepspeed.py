"""DeepSpeed backend on the CPU: ZeRO-3 cpu offload, init_inference, and the errors a user can fix.

The first DeepSpeed load starts a one-rank process group (DeepSpeed's shared-memory comm op, a
30-60 s JIT build, is skipped for one rank); the module-scoped ``zero3`` fixture does it once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

deepspeed = pytest.importorskip("deepspeed")

from edge_runtime.runtime.backends import BackendError, LoadRequest, get_backend  # noqa: E402
from edge_runtime.runtime.backends import deepspeed_zero  # noqa: E402
from edge_runtime.policy.planner.plan import DS_PERSISTENCE_THRESHOLD  # noqa: E402

from offload_models import TinyStack, plan_for, save_formats, save_random  # noqa: E402

# up/down weights (256 x 1024 = 262k elements) exceed ZeRO-3's persistence threshold (100k) and
# are partitioned; smaller tensors (norms, biases, 256 x 256 embed/head) stay resident by design.
SHAPE = {"hidden": 256, "ffn": 1024, "layers": 4}
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
# bf16 keeps 8 significant bits (relative rounding up to 2^-9 at each of the ~20 rounded weights,
# matmuls and norms); on these logits (|x| <= ~2.2) plain PyTorch bf16 is off from fp32 by at most
# 0.017 (measured), so 0.1 leaves ~6x margin yet catches a wrong cast (errors of order 1).
BF16_ATOL = 0.1
LINEAR = torch.nn.functional.linear


def _plain(checkpoint: Path, dtype: torch.dtype = torch.float32) -> TinyStack:
    """The model loaded with plain PyTorch: the reference outputs."""
    model = TinyStack(**SHAPE)
    model.load_state_dict(load_file(str(checkpoint)))
    for param in model.parameters():  # parameters only: the fp32 buffer `scale` stays fp32
        param.data = param.data.to(dtype)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_random(tmp_path_factory.mktemp("ds") / "tiny.safetensors", **SHAPE)[0]


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[torch.dtype, torch.Tensor]:
    # computed before any DeepSpeed load, so no DeepSpeed side effect can reach the reference
    with torch.no_grad():
        return {dt: _plain(checkpoint, dt)(IDS) for dt in (torch.float32, torch.bfloat16)}


def _request(checkpoint: Path, plan, dtype=torch.float32, **kw) -> LoadRequest:
    return LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=checkpoint, plan=plan,
                       device=torch.device("cpu"), dtype=dtype, **kw)


@pytest.fixture(scope="module")
def zero3(checkpoint, reference):
    """ZeRO-3 with cpu offload, fp32: the first load (process group) happens here."""
    plan = plan_for(SHAPE, 0.3, target="cpu")
    loaded = get_backend("deepspeed").load(_request(checkpoint, plan))
    yield loaded
    loaded.close()
    deepspeed_zero.shutdown()
    assert not torch.distributed.is_initialized()


def test_zero3_cpu_offload_partitions_and_matches(zero3, reference):
    plan, model = zero3.plan, zero3.model
    from deepspeed.comm import comm as ds_comm

    assert ds_comm.cdb.shm_comm_op is None  # one rank: DeepSpeed's shared-memory op was not JIT-built
    assert zero3.details == {"zero_stage": 3, "offload": "cpu", "mode": "zero3",
                             "partitioned_params": 2 * SHAPE["layers"]}
    offloaded = [b.name for b in plan.blocks if b.placement.startswith("stream:")]
    assert offloaded
    for name in offloaded:
        for pname, p in model.get_submodule(name).named_parameters():
            if p.ds_numel > DS_PERSISTENCE_THRESHOLD:
                assert p.numel() == 0 and p.ds_tensor.device.type == "cpu", f"{name}.{pname} not partitioned"
            else:
                assert p.ds_persist
    zero3.stats.reset()
    with torch.no_grad():
        out = model(IDS)
    assert torch.equal(out, reference[torch.float32])
    # ZeRO-3 partitions every big weight, the "gpu" blocks' too: each up and down, in fp32
    assert zero3.stats.bytes_moved == SHAPE["layers"] * 2 * 256 * 1024 * 4
    assert zero3.stats.loads == SHAPE["layers"] * 2
    # gathered weights are released again after use (the offloaded ones at least)
    assert model.get_submodule(offloaded[-1]).up.weight.numel() == 0
    # DeepSpeed's zero.Init would otherwise replace F.linear for every model in the process
    assert torch.nn.functional.linear is LINEAR


def test_bf16_close_to_fp32_and_buffer_stays_fp32(zero3, checkpoint, reference):
    for plan in (plan_for(SHAPE, 0.3, dtype=torch.bfloat16, target="cpu"),
                 plan_for(SHAPE, 1.0, dtype=torch.bfloat16)):
        loaded = get_backend("deepspeed").load(_request(checkpoint, plan, torch.bfloat16))
        try:
            with torch.no_grad():
                out = loaded.model(IDS)
            assert loaded.model.scale.dtype == torch.float32, loaded.details["mode"]
            assert loaded.model.blocks[0].up.weight.dtype == torch.bfloat16
            assert torch.equal(out, reference[torch.bfloat16])  # same as plain PyTorch in bf16
            assert (out.float() - reference[torch.float32]).abs().max() < BF16_ATOL
        finally:
            loaded.close()


def test_fp32_module_stays_fp32_under_zero3(zero3, checkpoint):
    plan = plan_for(SHAPE, 0.3, target="cpu")
    loaded = get_backend("deepspeed").load(_request(checkpoint, plan, torch.bfloat16,
                                                    fp32_modules=("blocks.3",)))
    try:
        block = loaded.model.blocks[3]
        assert block.up.weight.dtype == torch.float32 and block.up.weight.ds_tensor.dtype == torch.float32
        assert loaded.model.blocks[2].up.weight.ds_tensor.dtype == torch.bfloat16
    finally:
        loaded.close()
    # close() frees the weights even while the caller still holds the model
    assert all(p.numel() == 0 and p.ds_tensor.numel() == 0 for p in loaded.model.parameters())


def test_init_inference_when_nothing_offloaded(zero3, checkpoint, reference):
    plan = plan_for(SHAPE, 1.0)
    assert plan.offloaded is False and {b.placement for b in plan.blocks} == {"gpu"}
    loaded = get_backend("deepspeed").load(_request(checkpoint, plan))
    try:
        assert loaded.details == {"zero_stage": None, "offload": None, "mode": "inference",
                                  "partitioned_params": 0}
        with torch.no_grad():
            assert torch.equal(loaded.model(IDS), reference[torch.float32])
    finally:
        loaded.close()
    assert all(t.numel() == 0 for t in [*loaded.model.parameters(), *loaded.model.buffers()])


@pytest.fixture(scope="module")
def formats(checkpoint, tmp_path_factory) -> dict[str, Path]:
    return save_formats(checkpoint, tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("fmt", ["sharded", "sharded_folder", "folder", "torch", "torch_wrapped", "sharded_bin"])
@pytest.mark.parametrize("mode,fraction", [("zero3", 0.3), ("inference", 1.0)])
def test_every_checkpoint_format(zero3, formats, reference, fmt, mode, fraction):
    """Through open_checkpoint like the other backends: the same outputs as the single file."""
    loaded = get_backend("deepspeed").load(_request(formats[fmt], plan_for(SHAPE, fraction, target="cpu")))
    try:
        assert loaded.details["mode"] == mode
        with torch.no_grad():
            assert torch.equal(loaded.model(IDS), reference[torch.float32])
    finally:
        loaded.close()


@pytest.fixture
def no_op_builds(monkeypatch):
    """Fail the test if anything starts the process group or compiles an op."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    def forbidden(*args, **kwargs):
        raise AssertionError("built an op / process group before checking the NVMe path")

    monkeypatch.setattr(deepspeed, "init_distributed", forbidden)
    monkeypatch.setattr(OpBuilder, "load", forbidden)
    monkeypatch.setattr(OpBuilder, "jit_load", forbidden)


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir(mode=0o555)
        return path
    return Path("/proc/self")  # root ignores permission bits; procfs refuses new files to anyone


@pytest.mark.parametrize("case", ["missing", "file", "unwritable"])
def test_nvme_path_checked_first(checkpoint, tmp_path, no_op_builds, case):
    path = {"missing": tmp_path / "no-such-dir", "file": checkpoint,
            "unwritable": _unwritable_dir(tmp_path)}[case]
    plan = plan_for(SHAPE, 0.3, target="nvme")
    with pytest.raises(BackendError) as err:
        get_backend("deepspeed").load(_request(checkpoint, plan, options={"nvme_path": str(path)}))
    assert str(path) in str(err.value)
    assert {"missing": "does not exist", "file": "not a directory",
            "unwritable": "not writable"}[case] in str(err.value)


def test_nvme_without_libaio_says_what_to_install(checkpoint, tmp_path, no_op_builds, monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    plan = plan_for(SHAPE, 0.3, target="nvme")
    with pytest.raises(BackendError, match="apt-get install libaio-dev"):
        get_backend("deepspeed").load(_request(checkpoint, plan, offload_dir=tmp_path))


def test_missing_checkpoint_tensor_is_named(checkpoint, tmp_path, no_op_builds):
    state = load_file(str(checkpoint))
    del state["blocks.1.up.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(BackendError, match=r"blocks\.1\.up\.weight"):
        get_backend("deepspeed").load(_request(partial, plan_for(SHAPE, 0.3, target="cpu")))


@pytest.mark.parametrize("name,expected", [("gone.pt", "does not exist"), ("weights.npz", "unknown format")])
def test_bad_checkpoint_named_before_any_build(name, expected, tmp_path, no_op_builds):
    path = tmp_path / name
    if name.endswith(".npz"):
        path.write_bytes(b"PK")
    with pytest.raises(BackendError, match=expected) as err:
        get_backend("deepspeed").load(_request(path, plan_for(SHAPE, 0.3, target="cpu")))
    assert str(path) in str(err.value)


def test_deepspeed_not_importable_names_the_extra(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise
    with pytest.raises(BackendError, match=r"pip install 'edge-runtime\[deepspeed\]'"):
        get_backend("deepspeed").load(_request(checkpoint, plan_for(SHAPE, 1.0)))
