"""DeepSpeed backend: ZeRO-3 parameter offload (to cpu or NVMe) for plans that stream weights,
``deepspeed.init_inference`` for plans that keep everything resident.

ZeRO-3 cannot pin chosen blocks on the device: every parameter above the persistence threshold
is partitioned into the offload store and gathered by DeepSpeed's module hooks just before its
module runs (the plan's sizes bound how much stays live, see Plan.to_deepspeed_config).

DeepSpeed is imported inside ``load()`` only. It needs a process group even for one process: the
first load makes a one-rank group (gloo on CPU, nccl on CUDA) and later loads reuse it;
``shutdown()`` destroys it, if this module made it, once no DeepSpeed model is in use.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.paths import offload_dir as default_offload_dir
from edge_runtime.runtime.backends.base import Backend, BackendError, LoadedModel, LoadRequest, TransferStats
from edge_runtime.runtime.backends.checkpoint import open_checkpoint

INSTALL_HINT = "pip install 'edge-runtime[deepspeed]'"

_owns_group = False  # this module initialised torch.distributed (shutdown() may destroy it)
_env_set: list[str] = []
_OWNER_VAR = "EDGE_RUNTIME_DS_GROUP_PID"  # which process set the single-rank group variables  # environment variables set for that group, unset by shutdown()


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def load(self, request: LoadRequest) -> LoadedModel:
        deepspeed = _import_deepspeed()
        plan = request.plan
        inference = not plan.offloaded or request.options.get("mode") == "inference"
        # configuration and path errors first: before the model is built or any op compiled
        config, offload = (None, None) if inference else _zero3_config(request)
        _check_local_rank(request.device)
        model = _build(request)
        if offload == "nvme" and len({p.dtype for p in model.parameters()}) > 1:
            raise BackendError("NVMe offload swaps parameters in one dtype, but fp32_modules "
                               f"{list(request.fp32_modules)} keep some in fp32 next to {request.dtype}; "
                               "offload to cpu or use the streamer backend for this model")
        _ensure_process_group(deepspeed, request.device)

        stats, handles = TransferStats(), []
        if inference:
            engine = _init_inference(deepspeed, model, request)
        else:
            engine = _init_zero3(deepspeed, model, config, request.device)
            handles = _count_gathers(model, stats)
        details = {"zero_stage": None if inference else 3, "offload": offload,
                   "mode": "inference" if inference else "zero3",
                   "partitioned_params": sum(_partitioned(p) for p in model.parameters())}
        return LoadedModel(engine.module, self.name, plan, request.device, stats,
                           closer=functools.partial(_close, [engine], handles, model, not inference),
                           details=details)


def shutdown() -> None:
    """Destroy the process group if ``load()`` created it (left alone otherwise, e.g. under
    torchrun). Call once no DeepSpeed-loaded model is in use; a later load makes a new one."""
    global _owns_group
    if _owns_group and torch.distributed.is_initialized():
        import deepspeed.comm as ds_comm

        ds_comm.destroy_process_group()
    _owns_group = False
    while _env_set:
        os.environ.pop(_env_set.pop(), None)


# --- setup ------------------------------------------------------------------------------------
def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise BackendError(f"the deepspeed backend needs DeepSpeed, which cannot be imported ({exc}); "
                           f"install it with: {INSTALL_HINT}") from exc
    return deepspeed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_local_rank(device: torch.device) -> None:
    # DeepSpeed gathers parameters onto the GPU that LOCAL_RANK names, whatever we ask for
    rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and rank is not None and int(rank) != (device.index or 0):
        raise BackendError(f"LOCAL_RANK={rank} but the execution device is {device}: DeepSpeed "
                           "uses the GPU LOCAL_RANK names; make them agree")


def _ensure_process_group(deepspeed, device: torch.device) -> None:
    """A one-rank group unless one exists (ours from an earlier load, or a launcher's)."""
    global _owns_group
    created = not torch.distributed.is_initialized()
    if created:
        wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "RANK": "0", "WORLD_SIZE": "1",
                  "LOCAL_RANK": str(device.index or 0) if device.type == "cuda" else "0"}
        # Variables a parent process set for ITS group (marked with its pid) are not a launcher's:
        # a child reusing that MASTER_PORT would collide with the parent's rendezvous.
        inherited = os.environ.get(_OWNER_VAR) not in (None, str(os.getpid()))
        for key, value in wanted.items():
            if key not in os.environ or inherited:
                os.environ[key] = value or str(_free_port())
                _env_set.append(key)
        os.environ[_OWNER_VAR] = str(os.getpid())
        _env_set.append(_OWNER_VAR)
    # no-op when already initialised, but still gives deepspeed.comm a handle on a launcher's group
    with _no_shm_op_for_one_rank():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    _owns_group = _owns_group or created


@contextlib.contextmanager
def _no_shm_op_for_one_rank():
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (g++, 30-60 s) when its
    communication backend starts. One rank has no peer to reduce with, and without the op DeepSpeed
    uses torch.distributed's collectives, so a one-rank group skips the build."""
    import importlib

    # by name: `import deepspeed.comm.torch as m` gives the torch package deepspeed.comm re-exports
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    if os.environ.get("WORLD_SIZE") != "1" or not hasattr(ds_comm, "build_shm_op"):
        yield
        return
    build = ds_comm.build_shm_op
    ds_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_comm.build_shm_op = build


def _zero3_config(request: LoadRequest) -> tuple[dict[str, Any], str]:
    plan = request.plan
    device = "nvme" if plan.target == "nvme" else "cpu"  # a "disk" plan streams from host RAM here
    config = plan.to_deepspeed_config(nvme_path=_checked_nvme_path(request) if device == "nvme" else None)
    zero = config["zero_optimization"]
    offload = zero["offload_param"]
    if device == "cpu":
        for key in ("nvme_path", "buffer_count", "buffer_size"):
            offload.pop(key, None)
    offload.update(device=device, pin_memory=bool(plan.pin_memory) and request.device.type == "cuda")
    # The request's dtype is the compute dtype (the plan may be for another); DeepSpeed's NVMe swap
    # buffers take it from these flags. Parameters are cast by _build before partitioning, so
    # DeepSpeed never casts them itself (which would also cast the fp32_modules).
    config["bf16"] = {"enabled": request.dtype == torch.bfloat16}
    config["fp16"] = {"enabled": request.dtype == torch.float16}
    # else zero.Init swaps torch.nn.functional.linear process-wide for a training-memory variant
    zero["memory_efficient_linear"] = False
    if device == "nvme":
        _check_async_io()
    return config, device


def _checked_nvme_path(request: LoadRequest) -> str:
    given = request.options.get("nvme_path") or request.offload_dir or request.plan.offload_dir
    if given is None:  # our own cache folder: create it
        path = default_offload_dir()
        path.mkdir(parents=True, exist_ok=True)
    else:  # a folder the user named must already exist (a typo must not fill another drive)
        path = Path(given).expanduser()
        if not path.exists():
            raise BackendError(f"NVMe offload folder {path} does not exist; create it on the NVMe "
                               "drive or point options['nvme_path'] elsewhere")
        if not path.is_dir():
            raise BackendError(f"NVMe offload path {path} is not a directory")
    try:  # a real write: permission bits alone mislead (root, read-only mounts)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise BackendError(f"NVMe offload folder {path} is not writable: {exc}") from exc
    return str(path)


def _check_async_io() -> None:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise BackendError("NVMe offload needs DeepSpeed's async_io op, which cannot be built here: "
                           "libaio is missing. Run `apt-get install libaio-dev` (the first NVMe load "
                           "then compiles the op, a few minutes), or offload to cpu")


# --- model ------------------------------------------------------------------------------------
def _build(request: LoadRequest) -> nn.Module:
    """The model on the CPU with the checkpoint's weights, parameters in their target dtypes."""
    ckpt = open_checkpoint(request.checkpoint, request.ignore_keys)  # format and path errors before building
    model = request.build()
    for name, param in model.named_parameters():  # cast first: load_state_dict copies into it
        param.data = param.data.to(request.dtype_for(name, param))
    # mapped views, not copies: load_state_dict copies them into the model's own tensors
    missing, _ = model.load_state_dict(ckpt.map(ckpt.names(), populate=False), strict=False)
    if missing and hasattr(model, "tie_weights"):
        # tied copies (embeddings shared with a head) are saved once: tie, then they are present
        model.tie_weights()
        loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n not in missing}
        missing = [n for n in missing if id(_tensor(model, n)) not in loaded]
    if missing:  # non-persistent buffers are not state_dict keys, so never listed here
        raise BackendError(f"{ckpt.describe()} lacks {len(missing)} tensors the "
                           f"model needs, e.g. {missing[:5]}")
    if any(p.is_meta for p in model.parameters()):
        raise BackendError("the deepspeed backend needs build() to make real (not meta) tensors")
    return model.eval().requires_grad_(False)


def _tensor(model: nn.Module, name: str):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, attr)


def _init_inference(deepspeed, model: nn.Module, request: LoadRequest):
    # init_inference casts the whole module (buffers and fp32_modules too): keep those to put back
    saved = {n: t for n, t in [*model.named_buffers(), *model.named_parameters()]
             if t.is_floating_point() and t.dtype != request.dtype}
    engine = deepspeed.init_inference(model, dtype=request.dtype, replace_with_kernel_inject=False)
    _put_back(engine.module, saved, request.device)
    return engine


def _init_zero3(deepspeed, model: nn.Module, config: dict[str, Any], device: torch.device):
    # Partition parameter by parameter while the model is still on the CPU: deepspeed.initialize
    # would move a not-yet-partitioned model to the GPU whole. Buffers are never partitioned
    # and not moved by either, so they are put back (on the device, in their dtype) afterwards.
    saved = dict(model.named_buffers())
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    _put_back(model, saved, device)
    return engine


def _put_back(model: nn.Module, saved: dict[str, torch.Tensor], device: torch.device) -> None:
    """Re-seat saved tensors by name, on ``device`` and in their saved dtype."""
    for name, tensor in saved.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._buffers:
            module._buffers[attr] = tensor.to(device)
        else:
            module._parameters[attr].data = tensor.to(device)


# --- transfer accounting and teardown ---------------------------------------------------------
def _partitioned(param: nn.Parameter) -> bool:
    # persistent parameters (below the threshold) stay on the device and are never gathered
    return getattr(param, "ds_numel", 0) > 0 and not getattr(param, "ds_persist", False)


def _count_gathers(model: nn.Module, stats: TransferStats) -> list:
    """Count gathers at module granularity: each forward of a module that directly owns
    partitioned parameters adds all their bytes (in their dtype) and one load. An upper bound:
    DeepSpeed may keep a parameter live between uses within its reuse distance."""
    handles = []
    for module in model.modules():
        owned = [p for p in module.parameters(recurse=False) if _partitioned(p)]
        if owned:
            nbytes = sum(p.ds_numel * p.element_size() for p in owned)
            handles.append(module.register_forward_pre_hook(functools.partial(_add, stats, nbytes)))
    return handles


def _add(stats: TransferStats, nbytes: int, module: nn.Module, args: Any) -> None:
    stats.bytes_moved += nbytes
    stats.loads += 1


def _close(engines: list, handles: list, model: nn.Module, destroy: bool) -> None:
    for handle in handles:
        handle.remove()
    # ZeRO-3's destroy() removes its fetch hooks. InferenceEngine's only frees kernel-injection
    # workspace and fails when there is none (our case), so that engine is just dropped.
    if destroy and engines:
        engines[0].destroy()
    engines.clear()  # our last reference to the engine
    handles.clear()
    # The caller may still hold the model, and with it every weight (ZeRO-3 partitions hang off
    # the parameters, and its parameter dicts would gather them again on access): empty them all.
    for tensor in [*model.parameters(), *model.buffers()]:
        for held in (tensor, getattr(tensor, "ds_tensor", None)):
            if held is not None:
                held.data = torch.empty(0, dtype=held.dtype, device=held.device)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
