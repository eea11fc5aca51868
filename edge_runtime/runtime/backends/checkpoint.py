"""Storage only: the one way backends open a checkpoint, whatever its format.

    ckpt = open_checkpoint(path)
    ckpt.entries[name]          # dtype, shape, nbytes (and the file holding it)
    ckpt.read(name)             # a private copy of one tensor
    ckpt.map(names)             # zero-copy views backed by the file's pages

``path`` may be
  * a ``.safetensors`` file;
  * a sharded checkpoint's ``*.safetensors.index.json`` (Hugging Face layout; each shard read and
    mapped from its own file; a ``pytorch_model.bin.index.json`` works the same way);
  * a folder holding ``model.safetensors`` or ``model.safetensors.index.json`` (or, as
    transformers looks for them next, ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``);
  * a PyTorch state dict (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), loaded with
    ``torch.load(weights_only=True, mmap=True)``: never an unpickling that can run code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from edge_runtime.runtime.backends.base import BackendError
from edge_runtime.runtime.backends.checkpoint_safetensors import SafetensorsFile
from edge_runtime.runtime.backends.checkpoint_sharded import ShardedCheckpoint
from edge_runtime.runtime.backends.checkpoint_source import CheckpointSource, Entry
from edge_runtime.runtime.backends.checkpoint_torch import SUFFIXES as TORCH_SUFFIXES
from edge_runtime.runtime.backends.checkpoint_torch import TorchStateDict

Checkpoint = SafetensorsFile  # the single-file reader, under its former name

# what a folder may hold, in the order transformers' from_pretrained looks for it
FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ALLOWED = ("a .safetensors file, a sharded checkpoint's *.safetensors.index.json, a folder holding "
           f"{' or '.join(FOLDER_FILES[:2])}, or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")


def open_checkpoint(path: str | Path, ignore: Iterable[str] = ()) -> CheckpointSource:
    """The reader for ``path`` (see the module docstring); BackendError naming the file when it
    is missing, malformed, or of a format not listed there. Tensors whose names match a regular
    expression in ``ignore`` are left out (a published checkpoint's training-only head, as
    transformers' ``_keys_to_ignore_on_load_unexpected`` lists them)."""
    ckpt = _open_path(Path(path))
    patterns = [re.compile(p) for p in ignore]
    if patterns:
        for name in [n for n in ckpt.entries if any(p.search(n) for p in patterns)]:
            del ckpt.entries[name]
    return ckpt


def _open_path(path: Path) -> CheckpointSource:
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return _open_file(path / name)
        raise BackendError(f"checkpoint folder {path} holds none of {', '.join(FOLDER_FILES)}; "
                           f"expected {ALLOWED}")
    if not path.exists():
        raise BackendError(f"checkpoint {path} does not exist")
    return _open_file(path)


def _open_file(path: Path) -> CheckpointSource:
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path, _open_shard)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchStateDict(path)
    raise BackendError(f"checkpoint {path} has an unknown format (suffix {path.suffix or 'none'!r}); "
                       f"expected {ALLOWED}")


def _open_shard(path: Path) -> CheckpointSource:
    if path.name.endswith(".index.json"):
        raise BackendError(f"checkpoint shard {path} is itself an index; shards must be weight files")
    return _open_file(path)


__all__ = ["ALLOWED", "Checkpoint", "CheckpointSource", "Entry", "open_checkpoint"]
