"""Storage side of quantized residency: a plan's quantized blocks become a LoadRequest that every
backend (resident, accelerate, streamer) loads unchanged.

    request = quantize_request(request)   # load_model does this when plan.quantized_blocks()

* ``build``: the family's skeleton with every nn.Linear inside those blocks swapped for an empty
  QuantizedLinear (quantized_linear.py) holding ``qweight`` / ``scales`` (+ ``bias``).
* ``checkpoint``: an *overlay* index (Hugging Face sharded layout, metadata ``"overlay": true``):
  every original tensor except the quantized Linears' ``.weight`` stays in its original file
  (named by absolute path), and ``<linear>.qweight`` / ``<linear>.scales`` come from one cached
  safetensors file. Nothing else is copied; a streamed block maps its quantized bytes from the
  cache file as it maps any other weight from a checkpoint.

The cache (``$EDGE_RUNTIME_CACHE_DIR``/quantized/, one folder per key) is written once, atomically
(the index last, so a half-written folder is never used), and reused by later loads. The key
covers the checkpoint's files (path, size, mtime), the block -> precision map, the int4 group
size, the compute dtype and fp32 modules, and the int4 layout of each block (CPU packing follows
the CPU's vector ISA; CUDA's tinygemm packing differs; see quantized_linear.py).

Quantization reads one weight at a time from a memory map, so a 7B model never sits whole in RAM;
the output is written tensor by tensor. The source must be safetensors (single file, sharded
index or folder): a PyTorch state dict is refused with what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edge_runtime.paths import atomic_write, cache_dir
from edge_runtime.policy.quantization import INT4_GROUP_SIZE, PRECISIONS
from edge_runtime.runtime.backends.base import BackendError, LoadRequest
from edge_runtime.runtime.backends.checkpoint import CheckpointSource, open_checkpoint
from edge_runtime.runtime.backends.loading import build_skeleton
from edge_runtime.runtime.backends.quantized_linear import (QuantizedLinear, int4_layout, quantize_linears,
                                                            quantize_weight)

FORMAT = "edge_runtime.quantized.v1"  # bump when the stored tensors' meaning changes
INDEX = "model.safetensors.index.json"
TENSORS = "quantized.safetensors"
APPLIED = "quantized_checkpoint"  # options key marking a request already rewritten (its overlay index)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32"}


def quantize_request(request: LoadRequest) -> LoadRequest:
    """``request`` with its plan's quantized blocks stored int8/int4 (module docstring); unchanged
    when the plan quantizes nothing or the request was already rewritten."""
    precisions = request.plan.quantized_blocks()
    if not precisions or APPLIED in request.options:
        return request
    bad = sorted({p for p in precisions.values() if p not in PRECISIONS})
    if bad:
        raise BackendError(f"plan gives blocks precision(s) {bad}; quantized blocks must be one of {PRECISIONS}")
    ckpt = open_checkpoint(request.checkpoint, request.ignore_keys)
    if not ckpt.safetensors:
        raise BackendError(f"{ckpt.describe()}: quantized blocks need a safetensors checkpoint (the quantized "
                           "weights are laid over its files and memory-mapped); convert it once with "
                           "safetensors.torch.save_file(torch.load(path), 'model.safetensors'), or set "
                           "quantization.allowed=[] to load it unquantized")
    spec = _Spec(request, precisions)
    folder = _folder(ckpt, spec)
    index = folder / INDEX
    if not _usable(index):
        _write(ckpt, request, spec, folder)
    return dataclasses.replace(request, build=_QuantizedBuild(request.build, spec), checkpoint=index,
                               options={**request.options, APPLIED: str(index)})


class _Spec:
    """What decides the stored tensors: each block's precision, each Linear's compute dtype (fp32
    modules keep fp32 scales) and each block's int4 layout (where it computes)."""

    def __init__(self, request: LoadRequest, precisions: dict[str, str]) -> None:
        self.precisions = dict(sorted(precisions.items()))
        self.device = request.device
        self.dtype = request.dtype
        self.fp32_modules = tuple(request.fp32_modules)
        # blocks a CUDA plan computes on the CPU hold the CPU packing (moving them means repacking)
        self.cpu_blocks = {b for b in request.plan.cpu_modules() if b in precisions}
        self.group_size = INT4_GROUP_SIZE
        self._dtype_for = request.dtype_for

    def dtype_of(self, linear: str) -> torch.dtype:
        return self._dtype_for(f"{linear}.weight", torch.empty((), dtype=torch.float32))

    def device_of(self, block: str) -> torch.device:
        return torch.device("cpu") if block in self.cpu_blocks else self.device

    def layout_of(self, block: str, dtype: torch.dtype) -> str:
        return int4_layout(self.device_of(block), dtype)

    def key(self) -> dict:
        layouts = {b: [self.layout_of(b, d) for d in (self.dtype, torch.float32)]
                   for b, p in self.precisions.items() if p == "int4"}
        return {"format": FORMAT, "precisions": self.precisions, "group_size": self.group_size,
                "dtype": str(self.dtype), "fp32_modules": list(self.fp32_modules), "int4_layouts": layouts,
                "cpu_isa": torch.backends.cpu.get_cpu_capability() if "cpu" in str(layouts) else ""}

    def swap(self, model: nn.Module) -> dict[str, QuantizedLinear]:
        return quantize_linears(model, self.precisions, self.dtype_of, self.layout_of, self.group_size)


class _QuantizedBuild:
    """The family's build, then its quantized blocks' Linears swapped (on meta, inside the
    backend's init_empty_weights: the checkpoint fills them)."""

    def __init__(self, build: Callable[[], nn.Module], spec: _Spec) -> None:
        self.build, self.spec = build, spec

    def __call__(self) -> nn.Module:
        model = self.build()
        self.spec.swap(model)
        return model


# -- the cache ----------------------------------------------------------------------------------

def _folder(ckpt: CheckpointSource, spec: _Spec) -> Path:
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.files]
    digest = hashlib.sha256(json.dumps({"files": files, **spec.key()}, sort_keys=True).encode()).hexdigest()
    stem = ckpt.path.name.split(".")[0] if ckpt.path.is_file() else ckpt.path.name
    return cache_dir() / "quantized" / f"{stem or 'checkpoint'}-{digest[:24]}"


def _usable(index: Path) -> bool:
    """A complete cache entry: the index (written last) and every file it names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((index.parent / f).is_file() for f in set(weight_map.values()))


def _write(ckpt: CheckpointSource, request: LoadRequest, spec: _Spec, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot create the quantized-weights cache {folder} ({exc.strerror}); set "
                           "EDGE_RUNTIME_CACHE_DIR to a writable folder") from None
    model = build_skeleton(request)  # on meta: only names and shapes are needed
    swapped = spec.swap(model)
    if not swapped:
        raise BackendError(f"the plan quantizes blocks {sorted(spec.precisions)[:5]}, which hold no nn.Linear "
                           "in this model: is the plan for this model?")
    weights = {f"{name}.weight": module for name, module in swapped.items()}
    missing = [n for n in weights if n not in ckpt.entries]
    if missing:
        raise BackendError(f"{ckpt.describe()} lacks the Linear weight(s) {missing[:5]} of the blocks the plan "
                           "quantizes: was it saved from this model (state_dict names)?")
    for name, module in weights.items():
        shape = ckpt.entries[name].shape
        if tuple(shape) != (module.out_features, module.in_features):
            raise BackendError(f"{ckpt.describe()}: {name} has shape {list(shape)}, the model's Linear "
                               f"{[module.out_features, module.in_features]}")

    def produce():
        for wname, module in weights.items():
            base = wname[: -len(".weight")]
            device = spec.device_of(_block_of(base, spec.precisions))
            source = ckpt.map([wname], populate=False)[wname]
            qweight, scales = quantize_weight(source.to(device), module.precision, module.scales.dtype,
                                              module.layout or "cpu", module.group_size)
            del source
            yield f"{base}.qweight", qweight
            yield f"{base}.scales", scales

    layout = {}
    for wname, module in weights.items():
        base = wname[: -len(".weight")]
        layout[f"{base}.qweight"] = (module.qweight.dtype, tuple(module.qweight.shape))
        layout[f"{base}.scales"] = (module.scales.dtype, tuple(module.scales.shape))
    atomic_write(folder / TENSORS, lambda tmp: write_safetensors(tmp, layout, produce(), {"format": FORMAT}))

    weight_map = {n: str(e.file.resolve()) for n, e in ckpt.entries.items() if n not in weights}
    weight_map.update((n, TENSORS) for n in layout)
    body = {"metadata": {"overlay": True, "source": str(ckpt.path), **spec.key()}, "weight_map": weight_map}
    atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1), encoding="utf-8"))


def _block_of(linear: str, blocks) -> str:
    best = ""
    for b in blocks:
        if (b == "" or linear == b or linear.startswith(b + ".")) and len(b) >= len(best):
            best = b
    return best


def write_safetensors(path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensors,
                      metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written tensor by tensor: ``layout`` (name -> dtype, shape, in file
    order) makes the header up front, then ``tensors`` yields (name, tensor) in that order; only
    one tensor is held at a time."""
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    names = iter(layout)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, tensor in tensors:
            expected = next(names)
            dtype, shape = layout[expected]
            if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"tensor {name} {tensor.dtype} {list(tensor.shape)} does not match the "
                                     f"header's {expected} {dtype} {list(shape)}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
        if next(names, None) is not None:
            raise AssertionError("fewer tensors than the header lists")
        f.flush()
        os.fsync(f.fileno())
