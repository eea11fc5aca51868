"""One .safetensors file: the header parsed by hand (every tensor's dtype, shape and byte range),
so a block's tensors can be mapped straight from the file. Mapping costs no copy: while the page
cache holds the file, a "load" is page-table work, and the pages belong to the kernel
(reclaimable), not to the process's private heap."""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from edge_runtime.runtime.backends.base import BackendError
from edge_runtime.runtime.backends.checkpoint_source import CheckpointSource, Entry

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_PAGE = mmap.ALLOCATIONGRANULARITY


class SafetensorsFile(CheckpointSource):
    kind = "safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > self.path.stat().st_size - 8:
                    raise ValueError(f"header length {size} exceeds the file")
                header = json.loads(f.read(size))
        except FileNotFoundError:
            raise BackendError(f"checkpoint {self.path} does not exist") from None
        except (OSError, struct.error, ValueError) as exc:
            raise BackendError(f"checkpoint {self.path} is not a readable safetensors file: {exc}") from None
        base = 8 + size
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise BackendError(f"checkpoint {self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            lo, hi = info["data_offsets"]
            self.entries[name] = Entry(_DTYPES[info["dtype"]], tuple(info["shape"]), hi - lo, self.path,
                                       base + lo, base + hi)

    @property
    def safetensors(self) -> bool:
        return True

    def read(self, name: str) -> torch.Tensor:
        """Read straight into a new tensor. (safetensors' own get_tensor may return a view of
        its copy-on-write file mapping, shared with every later get_tensor of the same name.)"""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        with self.path.open("rb", buffering=0) as f:
            f.seek(e.start)
            while done < e.nbytes:  # one read() returns at most ~2 GiB
                got = f.readinto(view[done:])
                if not got:
                    raise BackendError(f"checkpoint {self.path} is truncated: tensor {name!r} ends past the file")
                done += got
        return out

    def map(self, names: list[str], populate: bool = True) -> dict[str, torch.Tensor]:
        """One shared read-only mapping of the byte range covering ``names``, released when the
        last returned tensor dies."""
        if not names:
            return {}
        entries = [self.entries[n] for n in names]
        lo = min(e.start for e in entries) // _PAGE * _PAGE
        hi = max(e.end for e in entries)
        # Read-only and shared: the pages ARE the page cache. (A writable private mapping would make
        # MAP_POPULATE break copy-on-write and copy every page: slower than reading the file.)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            region = mmap.mmap(fd, hi - lo, flags=flags, prot=mmap.PROT_READ, offset=lo)
        finally:
            os.close(fd)
        out = {}
        with warnings.catch_warnings():  # "buffer is not writable": nothing writes to weights
            warnings.simplefilter("ignore", UserWarning)
            for name, e in zip(names, entries):
                count = e.nbytes // e.dtype.itemsize
                flat = torch.frombuffer(region, dtype=e.dtype, count=count, offset=e.start - lo) if count \
                    else torch.empty(0, dtype=e.dtype)
                out[name] = flat.view(e.shape)
        return out
