"""Where disk-offloaded weights are read from: the checkpoint itself when it can serve them as
they are (nothing written), else a one-time converted .safetensors copy in the offload folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from edge_runtime.paths import offload_dir as default_offload_dir
from edge_runtime.runtime.backends.base import BackendError, LoadRequest
from edge_runtime.runtime.backends.checkpoint import CheckpointSource, open_checkpoint


def disk_store_for(ckpt: CheckpointSource, by_block: dict[str, list[str]],
                   request: LoadRequest) -> CheckpointSource:
    """The streamer's store: it maps a block's bytes and computes with them in place, so they
    must already be in their compute dtypes. The checkpoint itself when they are (any format
    maps zero-copy), else a copy converted once, so no load converts per forward."""
    names = [n for names in by_block.values() for n in names]
    targets = _targets(ckpt, names, request)
    if all(ckpt.entries[n].dtype == targets[n] for n in names):
        return ckpt
    return converted_copy(ckpt, names, targets, request)


def safetensors_store_for(ckpt: CheckpointSource, names: list[str], request: LoadRequest) -> CheckpointSource:
    """accelerate's store: its offload index names, per tensor, a .safetensors file that it opens
    with safe_open and casts on every load. A safetensors checkpoint (single or sharded) serves
    as it is; a PyTorch state dict is copied once into a .safetensors file in the compute dtypes
    (as from_pretrained writes a .bin checkpoint's disk-offloaded weights to its offload folder),
    so the reference backend keeps reading the way accelerate reads, by file name."""
    if ckpt.safetensors:
        return ckpt
    return converted_copy(ckpt, names, _targets(ckpt, names, request), request)


def converted_copy(ckpt: CheckpointSource, names: list[str], targets: dict[str, torch.dtype],
                   request: LoadRequest) -> CheckpointSource:
    """``names`` in their ``targets`` dtypes, in one .safetensors file in the offload folder,
    written once: the name keys on the checkpoint's files (path, size, mtime) and the dtypes."""
    folder = Path(request.offload_dir) if request.offload_dir else default_offload_dir()
    _check_writable(folder)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.files]
    wanted = sorted((n, str(targets[n])) for n in names)
    key = hashlib.sha256(repr((stats, wanted)).encode()).hexdigest()[:24]
    path = folder / f"{ckpt.path.name.split('.')[0] or 'checkpoint'}.{key}.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        # sources are mapped, not read: only converted tensors take private memory (and a tensor
        # sharing its storage with one already taken, a tied weight: safetensors stores each once)
        source, tensors, taken = ckpt.map(names, populate=False), {}, set()
        for n in names:
            tensor = source[n].to(targets[n]).contiguous()
            if tensor.untyped_storage().data_ptr() in taken:
                tensor = tensor.clone()
            taken.add(tensor.untyped_storage().data_ptr())
            tensors[n] = tensor
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return open_checkpoint(path)


def _targets(ckpt: CheckpointSource, names: list[str], request: LoadRequest) -> dict[str, torch.dtype]:
    return {n: request.dtype_for(n, torch.empty((), dtype=ckpt.entries[n].dtype)) for n in names}


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"offload folder {folder} cannot be created ({exc.strerror}); set "
                           "offload.offload_dir to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise BackendError(f"offload folder {folder} is not writable; set offload.offload_dir to a "
                           "writable folder")
