"""Mechanism layer: execute a placement Plan with one of several backends.

    from edge_runtime.runtime.backends import LoadRequest, load_model
    loaded = load_model(LoadRequest(build=..., checkpoint=path, plan=plan, device=dev, dtype=dt))
    loaded.model(...)          # blocks resident / streamed / computed on the CPU as planned
    loaded.stats.bytes_moved   # weights moved since the last reset
    loaded.close()

Backends (one placement mechanism each):
  resident     every weight on the execution device
  accelerate   HF accelerate's own hooks (AlignDevicesHook): cpu/disk offload, no prefetch
  streamer     our prefetching streamer: next block fetched while the current one computes
  deepspeed    ZeRO-3 parameter offload (cpu or nvme), or init_inference when all is resident
``request.checkpoint`` may be any format ``open_checkpoint`` reads (a .safetensors file, a sharded
checkpoint's index, a folder, a PyTorch state dict); every backend opens it through that.
A plan's quantized blocks (``Plan.quantized_blocks()``) load through every backend but deepspeed:
``load_model`` lays their int8/int4 weights over the checkpoint (see quantized.py).
``auto`` follows the plan: resident when nothing is offloaded, deepspeed for an nvme target,
else the streamer (the plan's "accelerate" means accelerate-style placement: device maps and
hooks; the streamer is that plus prefetch). DeepSpeed is imported only when asked for.
"""

from __future__ import annotations

from edge_runtime.policy.planner.backend_choice import auto_backend as choose_backend
from edge_runtime.runtime.backends.base import Backend, BackendError, LoadedModel, LoadRequest, TransferStats
from edge_runtime.runtime.backends.checkpoint import open_checkpoint

NAMES = ("auto", "resident", "accelerate", "streamer", "deepspeed")


def get_backend(name: str) -> Backend:
    if name == "resident":
        from edge_runtime.runtime.backends.resident import ResidentBackend

        return ResidentBackend()
    if name == "accelerate":
        from edge_runtime.runtime.backends.accelerate_hooks import AccelerateBackend

        return AccelerateBackend()
    if name == "streamer":
        from edge_runtime.runtime.backends.streamer import StreamerBackend

        return StreamerBackend()
    if name == "deepspeed":
        from edge_runtime.runtime.backends.deepspeed_zero import DeepSpeedBackend

        return DeepSpeedBackend()
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def load_model(request: LoadRequest, backend: str = "auto") -> LoadedModel:
    """Load ``request`` with ``backend`` (``auto``: the policy's choice for its plan). A plan with
    quantized blocks is first rewritten by quantized.quantize_request (quantized Linears in the
    skeleton, the checkpoint overlaid with cached quantized weights), so every backend loads it
    unchanged."""
    name = choose_backend(request.plan) if backend == "auto" else backend
    quantized = request.plan.quantized_blocks()
    if quantized:
        if name == "deepspeed":
            raise BackendError(
                f"the plan stores {len(quantized)} block(s) int8/int4 (e.g. {next(iter(quantized))}), which "
                "DeepSpeed ZeRO-3 cannot partition: use offload.backend streamer or accelerate (target cpu "
                "or disk), or plan without quantization (quantization.allowed=[] and quantization.force=null)")
        from edge_runtime.runtime.backends.quantized import quantize_request

        request = quantize_request(request)
    return get_backend(name).load(request)


__all__ = ["NAMES", "Backend", "BackendError", "LoadRequest", "LoadedModel", "TransferStats",
           "choose_backend", "get_backend", "load_model", "open_checkpoint"]
