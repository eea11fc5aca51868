"""HF accelerate's own offload: a device map from the plan, ``dispatch_model`` and its
AlignDevicesHook. Disk-offloaded blocks are read straight from the checkpoint (an offload index
pointing into the .safetensors file, or into each tensor's shard, the route
``from_pretrained(device_map=...)`` takes), so nothing is copied to an offload folder; only a
PyTorch state dict's disk blocks are copied there, once (see offload_store.safetensors_store_for).
No prefetch: every offloaded block is loaded when its forward starts and dropped when it ends.
This is the reference the streamer must beat."""

from __future__ import annotations

import logging
import warnings

import torch
from accelerate import dispatch_model
from accelerate.hooks import remove_hook_from_submodules

from edge_runtime.runtime.backends.base import Backend, BackendError, LoadedModel, LoadRequest, TransferStats
from edge_runtime.runtime.backends.checkpoint import CheckpointSource, open_checkpoint
from edge_runtime.runtime.backends.loading import build_skeleton, check_complete, load_tensors, owner, split_name
from edge_runtime.runtime.backends.offload_store import safetensors_store_for
from edge_runtime.runtime.backends.placement import cpu_compute_hooks, count_loads, device_map_for, inferred_device_map

_TORCH_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class AccelerateBackend(Backend):
    name = "accelerate"

    def load(self, request: LoadRequest) -> LoadedModel:
        ckpt = open_checkpoint(request.checkpoint, request.ignore_keys)
        plan = request.plan
        model = build_skeleton(request)
        mode = request.options.get("device_map", "plan")
        if mode == "plan":  # the planner's placement: keep_resident, AR blocks, cost model
            device_map = device_map_for(plan, request.device)
        elif mode == "infer":  # accelerate's own planner, given the plan's budget
            device_map = inferred_device_map(model, plan, request)
        else:
            raise BackendError(f"options.device_map must be 'plan' or 'infer', not {mode!r}")
        disk = [b for b, where in device_map.items() if where == "disk"]
        streamed, loaded = [], []
        for name in ckpt.names():
            block = owner(name, device_map)
            # persistent buffers (codebooks, running stats) stay with the module: accelerate's
            # hooks stream parameters only (offload_buffers=False), so they load up front here
            if block in disk and split_name(model, name)[2]:
                streamed.append(name)
            else:
                where = device_map.get(block, request.device)
                loaded.append((name, "cpu" if where == "cpu" else request.device))
        store = safetensors_store_for(ckpt, streamed, request) if streamed else None
        index = {}
        for name in streamed:
            # accelerate reads the tensor from its .safetensors file on every forward and casts it
            dtype = request.dtype_for(name, torch.empty((), dtype=ckpt.entries[name].dtype))
            index[name] = {"safetensors_file": str(store.entries[name].file), "weight_name": name,
                           "dtype": _TORCH_DTYPE_NAME.get(dtype, str(dtype).replace("torch.", ""))}
            _retype_on_meta(model, name, dtype)
        for name, where in loaded:
            load_tensors(model, ckpt, [name], where, request)
        check_complete(model, ckpt, skip=disk)
        stats = TransferStats()
        computed_on_cpu = set(plan.cpu_modules()) if mode == "plan" else set()
        offloaded = {key: _bytes_under(ckpt, key, request) for key, where in device_map.items()
                     if where == "disk" or (where == "cpu" and request.device.type != "cpu"
                                            and key not in computed_on_cpu)}
        # safetensors wants "cpu" or a CUDA index, not a torch.device, for where it reads to
        main = "cpu" if request.device.type == "cpu" else (request.device.index or 0)
        quiet = logging.getLogger("accelerate.big_modeling")  # "some parameters are on meta": by design
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with warnings.catch_warnings():  # keys naming a root buffer are fine: it stays put
                warnings.filterwarnings("ignore", message="The following device_map keys do not match")
                dispatch_model(model, device_map=device_map, main_device=main,
                               offload_index=index or None, offload_buffers=False)
        finally:
            quiet.level = level
        cpu_compute_hooks(model, plan, request.device)
        handles = count_loads(model, offloaded, stats)

        def close() -> None:
            for h in handles:
                h.remove()
            remove_hook_from_submodules(model)

        return LoadedModel(model, self.name, plan, request.device, stats, close,
                           details={"offloaded_blocks": len(offloaded), "prefetch": 0,
                                    "device_map_source": mode, "device_map": device_map,
                                    "store": str(store.path) if store else "ram"})


def _retype_on_meta(model, name: str, dtype: torch.dtype) -> None:
    """accelerate's hook casts each loaded tensor to the dtype of the placeholder it replaces, so
    the meta placeholder must already carry the compute dtype."""
    module, attr, is_param = split_name(model, name)
    table = module._parameters if is_param else module._buffers
    old = table[attr]
    if old.dtype != dtype:
        new = old.to("meta", dtype)
        table[attr] = torch.nn.Parameter(new, requires_grad=False) if is_param else new


def _bytes_under(ckpt: CheckpointSource, key: str, request: LoadRequest) -> int:
    """Bytes, in their target dtypes, of the checkpoint tensors a device-map key covers."""
    total = 0
    for name, entry in ckpt.entries.items():
        if owner(name, [key]) is not None:
            dtype = request.dtype_for(name, torch.empty((), dtype=entry.dtype))
            total += entry.nbytes // entry.dtype.itemsize * dtype.itemsize
    return total
