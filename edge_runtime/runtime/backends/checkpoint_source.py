"""What every backend reads weights through, whatever the checkpoint's format: each tensor's dtype,
shape and size up front, a private copy of one tensor, or zero-copy views of several.
``checkpoint.open_checkpoint`` picks the implementation for a path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Path  # the file holding the tensor's bytes (its shard, for a sharded checkpoint)
    start: int = -1  # absolute byte range in ``file``: safetensors only (-1: not byte-addressable)
    end: int = -1


class CheckpointSource(ABC):
    """A checkpoint whose tensor names equal the model's state_dict() names."""

    path: Path  # what the user named: a file, an index or a folder
    kind: str  # "safetensors", "sharded safetensors", "PyTorch state dict", ...
    entries: dict[str, Entry]

    @property
    def files(self) -> list[Path]:
        """The files holding tensor bytes (for cache keys: a converted copy follows them)."""
        return sorted({e.file for e in self.entries.values()})

    @property
    def safetensors(self) -> bool:
        """Every tensor lies in a .safetensors file (``entries[n].file``) that safetensors' own
        readers (accelerate's offload index) can open by name."""
        return False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def describe(self) -> str:
        return f"{self.kind} checkpoint {self.path}"

    @abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """A private, contiguous copy of one tensor (for weights that will be resident somewhere)."""

    @abstractmethod
    def map(self, names: list[str], populate: bool = True) -> dict[str, torch.Tensor]:
        """Read-only views of ``names`` backed by the file's pages, no copy. ``populate``
        pre-faults the pages, so compute that follows takes no page faults. Nothing may write to
        the returned tensors."""


def populate_pages(tensors: list[torch.Tensor]) -> None:
    """Fault in the pages under ``tensors`` (one byte read per page of each distinct storage)."""
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].max()
