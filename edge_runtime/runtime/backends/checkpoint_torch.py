"""A PyTorch state-dict file (torch.save's zip format: .pt, .pth, .bin, .ckpt), loaded with
``torch.load(weights_only=True, mmap=True)``: the restricted unpickler builds tensors, dicts and
plain values only and refuses anything that would run code, and every tensor is a view of a
private (copy-on-write) memory map of the file, so opening costs page-table work, not a copy."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from edge_runtime.runtime.backends.base import BackendError
from edge_runtime.runtime.backends.checkpoint_source import CheckpointSource, Entry, populate_pages

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Training checkpoints often wrap the weights; such a wrapper is accepted when exactly one of
# these keys holds tensors and nothing else in the file does (e.g. Lightning's
# {"state_dict": ..., "epoch": ...}). Several tensor-holding keys are ambiguous: refused.
WRAPPER_KEYS = ("state_dict", "model")
_RESAVE = "save a plain state_dict with torch.save(model.state_dict())"


class TorchStateDict(CheckpointSource):
    kind = "PyTorch state dict"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"checkpoint {self.path} does not exist")
        if not zipfile.is_zipfile(self.path):
            raise BackendError(f"checkpoint {self.path} is not a zip-format PyTorch checkpoint (a legacy "
                               "torch.save format, or not a PyTorch file at all), which cannot be "
                               f"memory-mapped; re-save it with PyTorch >= 1.6: {_RESAVE}")
        try:
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:  # weights_only met a class or function to call
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise BackendError(f"checkpoint {self.path} holds objects that need code to unpickle{what}: "
                               f"refusing to unpickle code; {_RESAVE}") from None
        except (OSError, RuntimeError, ValueError, EOFError, KeyError) as exc:
            raise BackendError(f"checkpoint {self.path} is not a readable PyTorch checkpoint: {exc}") from None
        self._state = _flat_state(self.path, loaded)
        self.entries = {name: Entry(t.dtype, tuple(t.shape), t.numel() * t.element_size(), self.path)
                        for name, t in self._state.items()}

    def read(self, name: str) -> torch.Tensor:
        source = self._state[name]
        return torch.empty(source.shape, dtype=source.dtype).copy_(source)

    def map(self, names: list[str], populate: bool = True) -> dict[str, torch.Tensor]:
        """The memory-mapped tensors themselves (they already view the file's pages)."""
        out = {name: self._state[name] for name in names}
        if populate:
            populate_pages(list(out.values()))
        return out


def _flat_state(path: Path, loaded) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict):
        raise BackendError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict "
                           f"(a dict of tensor name -> tensor); {_RESAVE}")
    if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded
    else:
        holders = [k for k, v in loaded.items() if isinstance(v, torch.Tensor)
                   or (isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values()))]
        if len(holders) == 1 and holders[0] in WRAPPER_KEYS:
            state = loaded[holders[0]]
            where = f" under {holders[0]!r}"
        else:
            found = f"tensors under keys {holders[:5]}" if holders else "no tensors"
            raise BackendError(f"checkpoint {path} is not a state dict (a flat dict of tensor name -> "
                               f"tensor, or one wrapped under one of {list(WRAPPER_KEYS)}): it holds "
                               f"{found}; {_RESAVE}")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise BackendError(f"checkpoint {path}: the state dict{where} holds non-tensor values "
                               f"under {bad[:5]}; {_RESAVE}")
    odd = [k for k, v in state.items() if not isinstance(k, str) or v.layout != torch.strided]
    if odd:
        raise BackendError(f"checkpoint {path}: entries {odd[:5]} are not named dense tensors; {_RESAVE}")
    return dict(state)
