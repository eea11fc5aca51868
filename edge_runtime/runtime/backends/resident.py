"""Everything on the execution device: the baseline every other backend must equal."""

from __future__ import annotations

from edge_runtime.runtime.backends.base import Backend, LoadedModel, LoadRequest
from edge_runtime.runtime.backends.checkpoint import open_checkpoint
from edge_runtime.runtime.backends.loading import build_skeleton, check_complete, load_tensors


class ResidentBackend(Backend):
    name = "resident"

    def load(self, request: LoadRequest) -> LoadedModel:
        ckpt = open_checkpoint(request.checkpoint, request.ignore_keys)
        model = build_skeleton(request)
        nbytes = load_tensors(model, ckpt, ckpt.names(), request.device, request)
        check_complete(model, ckpt)
        model.to(request.device)  # the constructor's buffers follow the weights
        return LoadedModel(model, self.name, request.plan, request.device,
                           details={"resident_bytes": nbytes})
