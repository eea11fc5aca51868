"""Plan -> what the hook-based backends attach: the device map on this execution device, hooks
that run "cpu"-placed blocks on the CPU, and per-block load counters."""

from __future__ import annotations

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from torch import nn

from edge_runtime.policy.planner.plan import Plan
from edge_runtime.runtime.backends.base import TransferStats


def device_map_for(plan: Plan, device: torch.device) -> dict[str, int | str]:
    """The plan's accelerate device map with "gpu" meaning ``device``. On a CPU execution device
    "gpu" and "cpu" are both plain RAM; "disk" still streams from the checkpoint."""
    if device.type == "cpu":
        return {b.name: ("disk" if b.placement in ("stream:disk", "stream:nvme") else "cpu")
                for b in plan.blocks}
    index = device.index if device.index is not None else 0
    return {b.name: v if v != 0 else index
            for b, v in zip(plan.blocks, plan.to_accelerate_device_map(gpu_index=0).values())}


def inferred_device_map(model: nn.Module, plan: Plan, request) -> dict[str, int | str]:
    """accelerate's own answer, ``infer_auto_device_map``, with max_memory from the plan's budget:
    the execution device gets what the budget leaves for weights (VRAM - reserve - activations -
    KV cache), host RAM what is free (none when the plan streams from disk), the rest goes to disk;
    blocks of the model's no-split classes are never cut. It knows nothing of keep_resident,
    autoregressive blocks or prefetch: the planner's map (the default) does."""
    import warnings

    import psutil
    from accelerate import infer_auto_device_map

    budget = plan.budget
    room = max(0, budget.usable_bytes - budget.activation_bytes - budget.kv_cache_bytes)
    cpu_room = 0 if plan.target in ("disk", "nvme") else psutil.virtual_memory().available
    index = request.device.index or 0 if request.device.type == "cuda" else 0
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    with warnings.catch_warnings():  # on a CPU-only machine accelerate warns that device 0 is absent
        warnings.simplefilter("ignore")
        dmap = infer_auto_device_map(model, max_memory={index: room, "cpu": cpu_room},
                                     no_split_module_classes=list(request.no_split_modules),
                                     dtype=request.dtype)
    if request.device.type == "cpu":  # "resident" on a CPU execution device is plain RAM
        dmap = {k: ("cpu" if v == index else v) for k, v in dmap.items()}
    return dmap


def cpu_compute_hooks(model: nn.Module, plan: Plan, device: torch.device) -> None:
    """Blocks placed "cpu" compute there: inputs go to the CPU and outputs come back, the weights
    never cross PCIe (accelerate's device maps cannot say this: "cpu" there means offloaded)."""
    if device.type == "cpu":
        return
    for name in plan.cpu_modules():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Module) or any(p.device.type == "meta" for p in module.parameters()):
            continue
        module.to("cpu")
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))


def count_loads(model: nn.Module, offloaded: dict[str, int], stats: TransferStats) -> list:
    """A forward pre-hook per offloaded block adding its bytes to ``stats``: every offloaded
    block's weights are brought in once per forward of that block."""
    handles = []
    for name, nbytes in offloaded.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a bare parameter key: counted with its owner's forward
            continue

        def hook(_module, _args, nbytes=nbytes):
            stats.bytes_moved += nbytes
            stats.loads += 1

        handles.append(module.register_forward_pre_hook(hook))
    return handles
