"""The contract every placement backend follows: take a model skeleton, its checkpoint (any
format ``checkpoint.open_checkpoint`` reads) and a Plan; return the model with every block where
the plan says, ready to run.

A backend is mechanism only: it never decides placements (the planner did) and never looks at
profile tiers. The execution device is CUDA on a GPU machine; on a CPU-only machine the same code
runs with ``device="cpu"``, "gpu" placements then meaning "resident on the execution device", so
CPU tests walk the same paths (disk streaming, hooks, partitioning) the GPU does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.policy.planner.plan import Plan


class BackendError(EdgeRuntimeError, RuntimeError):
    """A backend cannot load this model as asked; the message says why and what to do."""


@dataclass
class TransferStats:
    """What moved while the model ran: weight bytes brought to the execution device (or, on the
    CPU, read from the offload store) and how many block loads that took. Reset per request."""

    bytes_moved: int = 0
    loads: int = 0
    waits_s: float = 0.0  # time a block's forward waited for its weights (not hidden by prefetch)

    def reset(self) -> None:
        self.bytes_moved, self.loads, self.waits_s = 0, 0, 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_moved": self.bytes_moved, "loads": self.loads, "waits_s": round(self.waits_s, 6)}


@dataclass
class LoadRequest:
    """Everything a backend needs. ``build`` constructs the model's skeleton; it is called inside
    accelerate's ``init_empty_weights()`` (parameters on meta, buffers real) by the backends that
    stream, and normally by the resident one."""

    build: Callable[[], nn.Module]
    # names equal the model's state_dict() names; a .safetensors file, a sharded checkpoint's
    # *.index.json, a folder holding model.safetensors(.index.json), or a PyTorch state dict
    # (.pt/.pth/.bin/.ckpt): see checkpoint.open_checkpoint, the one opener every backend uses
    checkpoint: Path
    plan: Plan
    device: torch.device  # execution device: cuda:N, or cpu on a machine without a GPU
    dtype: torch.dtype  # compute dtype of floating weights
    fp32_modules: tuple[str, ...] = ()  # module prefixes kept in fp32 (fragile stages, codecs)
    offload_dir: Path | None = None  # scratch for disk/NVMe offload files
    no_split_modules: tuple[str, ...] = ()  # module classes a device map must not split
    ignore_keys: tuple[str, ...] = ()  # regexes of checkpoint tensors the model lacks on purpose (left unread)
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs

    def dtype_for(self, tensor_name: str, tensor: torch.Tensor) -> torch.dtype:
        """Target dtype of one checkpoint tensor: integer tensors keep theirs, fp32 modules fp32."""
        if not tensor.is_floating_point():
            return tensor.dtype
        if any(tensor_name == p or tensor_name.startswith(p + ".") for p in self.fp32_modules):
            return torch.float32
        return self.dtype


class LoadedModel:
    """A model placed by a backend. ``close()`` releases what the backend holds (hooks, pinned
    buffers, memory maps, process groups); the model must not be used afterwards."""

    def __init__(self, model: nn.Module, backend: str, plan: Plan, device: torch.device,
                 stats: TransferStats | None = None, closer: Callable[[], None] | None = None,
                 details: dict[str, Any] | None = None, runtime_state: Any = None) -> None:
        self.model = model
        self.runtime_state = runtime_state  # the backend's live object (streamer, engine), for inspection
        self.backend = backend
        self.plan = plan
        self.device = device
        self.stats = stats or TransferStats()
        self.details = details or {}
        self._closer = closer

    def end_request(self) -> None:
        """A request finished: blocks kept for repeated calls within it are released, so between
        requests only the plan's resident blocks hold device memory."""
        hook = getattr(self.runtime_state, "end_request", None)
        if hook is not None:
            hook()

    def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": str(self.device), **self.details,
                **self.stats.to_dict()}


class Backend(ABC):
    name: str

    @abstractmethod
    def load(self, request: LoadRequest) -> LoadedModel:
        """Place ``request``'s model as its plan says; raise BackendError when impossible."""
