"""Shared steps of the backends that build a skeleton and fill it from a checkpoint: build on
meta, copy chosen tensors in (cast to their target dtype), find which block owns a tensor, and
check that nothing was left on meta."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from edge_runtime.runtime.backends.base import BackendError, LoadRequest
from edge_runtime.runtime.backends.checkpoint import CheckpointSource


def build_skeleton(request: LoadRequest) -> nn.Module:
    """The model with parameters on meta (no memory) and buffers real: non-persistent buffers
    (rotary frequencies, mel filters) are not in checkpoints and must come from the constructor."""
    with init_empty_weights(include_buffers=False):
        model = request.build()
    return model.eval()


def owner(tensor_name: str, block_names: Iterable[str]) -> str | None:
    """The block (device-map key) holding ``tensor_name``; None when no block does."""
    best = None
    for b in block_names:
        if b == "" or tensor_name == b or tensor_name.startswith(b + "."):
            if best is None or len(b) > len(best):
                best = b
    return best


def load_tensors(model: nn.Module, ckpt: CheckpointSource, names: Iterable[str], device: torch.device | str,
                 request: LoadRequest) -> int:
    """Copy ``names`` from the checkpoint into the model on ``device``; returns bytes loaded."""
    total = 0
    for name in names:
        if _lookup(model, name) is None:
            raise _unknown(ckpt, [name])
        tensor = ckpt.read(name)
        dtype = request.dtype_for(name, tensor)
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
        total += tensor.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def check_complete(model: nn.Module, ckpt: CheckpointSource, skip: Iterable[str] = ()) -> None:
    """Every parameter is real (or deliberately left on meta for a hook to fill)."""
    skip = list(skip)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied copies are saved once (transformers' lm_head / embeddings)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"
               and owner(n, skip) is None]
    if missing:
        raise BackendError(f"{ckpt.describe()} lacks {len(missing)} tensor(s) the model needs, "
                           f"e.g. {missing[:5]}: was it saved from this model (state_dict names)?")
    unknown = [n for n in ckpt.names() if _lookup(model, n) is None]
    if unknown:
        raise _unknown(ckpt, unknown)


def _unknown(ckpt: CheckpointSource, names: list[str]) -> BackendError:
    return BackendError(f"{ckpt.describe()} has {len(names)} tensor(s) the model lacks, "
                        f"e.g. {names[:5]}: wrong checkpoint for this model?")


def _lookup(model: nn.Module, name: str):
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    if attr in module._parameters or attr in module._buffers:
        return module
    return None


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    """(owning module, attribute, is_parameter) of a tensor name."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise BackendError(f"the checkpoint has a tensor {name!r} the model lacks: wrong checkpoint "
                           "for this model?") from None
    return module, attr, attr in module._parameters
