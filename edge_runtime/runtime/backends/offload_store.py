"""Where disk-streamed weights are read from: the checkpoint itself when its dtypes already match
the compute dtypes (nothing written), else a one-time converted copy in the offload folder, so
every later load maps the bytes it computes with instead of converting per forward."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from edge_runtime.paths import offload_dir as default_offload_dir
from edge_runtime.runtime.backends.base import BackendError, LoadRequest
from edge_runtime.runtime.backends.checkpoint import Checkpoint


def disk_store_for(ckpt: Checkpoint, by_block: dict[str, list[str]], request: LoadRequest) -> Checkpoint:
    names = [n for names in by_block.values() for n in names]
    targets = {n: request.dtype_for(n, torch.empty((), dtype=ckpt.entries[n].dtype)) for n in names}
    if all(ckpt.entries[n].dtype == targets[n] for n in names):
        return ckpt
    folder = Path(request.offload_dir) if request.offload_dir else default_offload_dir()
    _check_writable(folder)
    stat = ckpt.path.stat()
    key = hashlib.sha256(repr((str(ckpt.path.resolve()), stat.st_size, stat.st_mtime_ns,
                               sorted((n, str(d)) for n, d in targets.items()))).encode()).hexdigest()[:24]
    path = folder / f"{ckpt.path.stem}.{key}.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        # one block at a time keeps the conversion's peak memory at one block
        tensors = {n: ckpt.read(n).to(targets[n]).contiguous() for n in names}
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return Checkpoint(path)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"offload folder {folder} cannot be created ({exc.strerror}); set "
                           "offload.offload_dir to a writable folder") from None
    if not os.access(folder, os.W_OK):
        raise BackendError(f"offload folder {folder} is not writable; set offload.offload_dir to a "
                           "writable folder")
