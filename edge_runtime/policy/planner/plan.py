"""The planner's answer: where each block lives, what that costs, and how to hand it to a backend.

Placements:
  gpu          resident on the GPU for the whole run
  stream:cpu   kept in (pinned) host RAM, copied in before use, next block prefetched
  stream:disk  kept in an offload folder, read and copied in before use
  stream:nvme  kept on an NVMe drive through DeepSpeed ZeRO-3 async io
  cpu          computed on the CPU (activations cross PCIe, the weights never do)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.paths import offload_dir as resolve_offload_dir
from edge_runtime.policy.planner.budget import Budget
from edge_runtime.policy.planner.layout import gib

_ACCELERATE_VALUE = {"stream:cpu": "cpu", "stream:disk": "disk", "stream:nvme": "disk", "cpu": "cpu"}
# ZeRO-3 keeps parameters smaller than this (norms, biases) on the GPU; DeepSpeed's default.
DS_PERSISTENCE_THRESHOLD = 100_000


class PlanError(EdgeRuntimeError, ValueError):
    """No placement satisfies the profile; the message says what is missing and how much."""


@dataclass(frozen=True)
class BlockPlacement:
    name: str  # module (or parameter) name in the model: a device_map key
    component: str
    index: int
    placement: str
    bytes: int
    params: int
    autoregressive: bool
    kv_bytes: int  # its KV cache, on the GPU unless placement is cpu
    extra_s: float  # predicted extra seconds per request
    extra_per_token_s: float  # predicted extra seconds per generated token (AR only)
    submodel: str = ""  # the checkpoint it comes from ("" the main one); see ModelLayout.with_submodel
    precision: str = ""  # "" = the plan's dtype; "int8" / "int4": its Linear weights quantized
    predicted_error: float = 0.0  # relative output error the precision is predicted to add (0 unquantized)
    fp32: bool = False  # kept fp32 under a half-precision plan (a codec, a fragile stage)


@dataclass(frozen=True)
class Plan:
    model_name: str
    dtype: str
    blocks: tuple[BlockPlacement, ...]
    backend: str  # resident | accelerate | streamer | deepspeed
    target: str  # cpu | disk | nvme: where streamed weights are kept
    prefetch: int  # blocks copied ahead of the one computing
    pin_memory: bool
    offload_dir: str | None
    budget: Budget
    inflight_bytes: int  # buffers for streamed blocks: (1 + prefetch) x largest streamed unit
    kv_gpu_bytes: int
    notes: tuple[str, ...] = ()
    # The largest batch this placement holds: weights, streaming buffers and reserve stay, while
    # activations and the GPU KV cache grow linearly with the batch. None: CPU-only, no VRAM bound.
    max_batch: int | None = None
    # Every per-frame block that computes is resident (precision.fits); False: some compute on the
    # CPU or stream on every frame (slow, but it runs). None: not assessed (a hand-made plan).
    fits: bool | None = None

    # --- totals -----------------------------------------------------------------------------
    def _sum(self, pred) -> int:
        return sum(b.bytes for b in self.blocks if pred(b.placement))

    @property
    def resident_bytes(self) -> int:
        return 0 if self.cpu_only else self._sum(lambda p: p == "gpu")

    @property
    def streamed_bytes(self) -> int:
        return self._sum(lambda p: p.startswith("stream:"))

    @property
    def cpu_bytes(self) -> int:
        return self._sum(lambda p: p == "cpu")

    @property
    def cpu_only(self) -> bool:
        return self.budget.cpu_only

    @property
    def offloaded(self) -> bool:
        return any(b.placement != "gpu" for b in self.blocks)

    @property
    def peak_vram_bytes(self) -> int:
        """Resident weights + streamed blocks in flight + activations + GPU KV cache."""
        if self.cpu_only:
            return 0
        return self.resident_bytes + self.inflight_bytes + self.budget.activation_bytes + self.kv_gpu_bytes

    @property
    def extra_latency_s(self) -> float:
        return sum(b.extra_s for b in self.blocks)

    @property
    def extra_latency_per_token_s(self) -> float:
        return sum(b.extra_per_token_s for b in self.blocks)

    def placement_of(self, name: str) -> str:
        for b in self.blocks:
            if b.name == name:
                return b.placement
        raise KeyError(name)

    def precision_of(self, block: BlockPlacement) -> str:
        """What a block's weights are stored in: int8 / int4, fp32 for kept-fp32 parts, else the plan's dtype."""
        return block.precision or ("fp32" if block.fp32 else self.dtype)

    def quantized_blocks(self) -> dict[str, str]:
        """Block name -> "int8" / "int4" for the blocks whose Linear weights are stored quantized."""
        return {b.name: b.precision for b in self.blocks if b.precision}

    def cpu_modules(self) -> list[str]:
        """Blocks to *compute* on the CPU: an accelerate device_map says "cpu" for them as for
        stream:cpu, so the backend needs this list to tell the two apart."""
        return [b.name for b in self.blocks if b.placement == "cpu"]

    @property
    def submodels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.submodel for b in self.blocks))

    def for_submodel(self, name: str) -> Plan:
        """The part of this plan one sub-model's backend executes: its blocks, named as modules
        inside that sub-model, under the same budget and options."""
        prefix = f"{name}:" if name else ""
        blocks = tuple(dataclasses.replace(b, name=b.name[len(prefix):]) for b in self.blocks if b.submodel == name)
        if not blocks:
            raise KeyError(f"plan has no sub-model {name!r}; it has {list(self.submodels)}")
        return dataclasses.replace(self, blocks=blocks)

    # --- exports ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "dtype": self.dtype, "backend": self.backend,
            "target": self.target, "prefetch": self.prefetch, "pin_memory": self.pin_memory,
            "offload_dir": self.offload_dir, "budget": self.budget.to_dict(),
            "resident_bytes": self.resident_bytes, "streamed_bytes": self.streamed_bytes,
            "cpu_bytes": self.cpu_bytes, "inflight_bytes": self.inflight_bytes,
            "kv_gpu_bytes": self.kv_gpu_bytes, "peak_vram_bytes": self.peak_vram_bytes,
            "extra_latency_s": self.extra_latency_s,
            "extra_latency_per_token_s": self.extra_latency_per_token_s,
            "notes": list(self.notes), "max_batch": self.max_batch, "fits": self.fits,
            "quantized_blocks": len(self.quantized_blocks()),
            "blocks": [{"name": b.name, "submodel": b.submodel, "component": b.component, "index": b.index,
                        "placement": b.placement, "bytes": b.bytes, "autoregressive": b.autoregressive,
                        "kv_bytes": b.kv_bytes, "extra_s": b.extra_s,
                        "extra_per_token_s": b.extra_per_token_s, "precision": self.precision_of(b),
                        "predicted_error": b.predicted_error} for b in self.blocks],
        }

    def table(self) -> str:
        """Consecutive blocks of one component with one placement share a row."""
        head = f"{'component':<20} {'blocks':>9} {'AR':<3} {'placement':<12} {'prec':<5} {'GiB':>7} " \
               f"{'KV GiB':>7} {'+ms/req':>9} {'+ms/tok':>8} {'error':>6}"
        lines = [head, "-" * len(head)]
        for rows in _runs(self.blocks):
            first, last = rows[0], rows[-1]
            span = str(first.index) if first is last else f"{first.index}-{last.index}"
            lines.append(
                f"{first.component:<20} {span:>9} {'yes' if first.autoregressive else 'no':<3} "
                f"{first.placement:<12} {self.precision_of(first):<5} {gib(sum(r.bytes for r in rows)):7.3f} "
                f"{gib(sum(r.kv_bytes for r in rows)):7.3f} {1e3 * sum(r.extra_s for r in rows):9.1f} "
                f"{1e3 * sum(r.extra_per_token_s for r in rows):8.2f} "
                f"{'-' if not first.precision else format(first.predicted_error, '.3f'):>6}")
        lines.append("-" * len(head))
        lines.append(f"resident {gib(self.resident_bytes):.2f} GiB, streamed from {self.target} "
                     f"{gib(self.streamed_bytes):.2f} GiB, on CPU {gib(self.cpu_bytes):.2f} GiB; "
                     f"backend {self.backend}")
        if not self.cpu_only:
            lines.append(f"peak VRAM {gib(self.peak_vram_bytes):.2f} GiB of {gib(self.budget.usable_bytes):.2f} "
                         f"usable (+{gib(self.budget.reserve_bytes):.2f} reserve): in flight "
                         f"{gib(self.inflight_bytes):.2f}, activations {gib(self.budget.activation_bytes):.2f}, "
                         f"KV {gib(self.kv_gpu_bytes):.2f}")
        lines.append("batch bound: none (CPU-only: no VRAM bound)" if self.max_batch is None else
                     f"batch bound: at most {self.max_batch} requests per batch fit the budget")
        lines.append(f"predicted extra latency (estimate): {self.extra_latency_s * 1e3:.1f} ms per request, "
                     f"{self.extra_latency_per_token_s * 1e3:.2f} ms per token")
        quantized = self.quantized_blocks()
        if quantized:
            counts = {p: sum(1 for v in quantized.values() if v == p) for p in dict.fromkeys(quantized.values())}
            worst = max(b.predicted_error for b in self.blocks)
            lines.append("quantized: " + ", ".join(f"{n} blocks {p}" for p, n in counts.items())
                         + f" (predicted error up to {worst:.3f} per layer); the rest {self.dtype}")
        if self.fits is not None and not self.cpu_only:
            lines.append("fits: every per-frame block is on the GPU" if self.fits else
                         "does not fit: some per-frame blocks compute off the GPU on every frame")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_accelerate_device_map(self, module_names: Iterable[str] | None = None,
                                 gpu_index: int = 0) -> dict[str, int | str]:
        """HF ``device_map``: gpu -> ``gpu_index``, stream:cpu and cpu -> "cpu", stream:disk /
        stream:nvme -> "disk" (accelerate has no NVMe tier). Pass the model's parameter and buffer
        names as ``module_names`` to check that every one is covered by a key."""
        if self.cpu_only:
            dmap: dict[str, int | str] = {b.name: "cpu" for b in self.blocks}
        else:
            dmap = {b.name: gpu_index if b.placement == "gpu" else _ACCELERATE_VALUE[b.placement]
                    for b in self.blocks}
        if module_names is not None:
            missing = [n for n in module_names if not _covered(n, dmap)]
            if missing:
                raise PlanError(f"device map misses {len(missing)} tensors, e.g. {missing[:5]}: "
                                "was the layout built from this model?")
        return dmap

    def to_deepspeed_config(self, nvme_path: str | None = None) -> dict[str, Any]:
        """ZeRO-3 inference config. ZeRO-3 cannot pin chosen blocks on the GPU; it keeps up to
        ``stage3_max_live_parameters`` elements live and does not release those reused within
        ``stage3_max_reuse_distance``, so both are set to the plan's resident + in-flight size.
        NVMe files go to ``nvme_path``, else offload.offload_dir, else the user cache dir."""
        streamed = [b for b in self.blocks if b.placement.startswith("stream:")]
        elem = {"bf16": 2, "fp16": 2}.get(self.dtype, 4)
        device = "none" if not streamed else ("cpu" if self.target == "cpu" else "nvme")
        live = (self.resident_bytes + self.inflight_bytes) // elem
        biggest = max((b.params for b in streamed), default=0)
        offload: dict[str, Any] = {"device": device, "pin_memory": self.pin_memory}
        if device == "nvme":
            path = str(nvme_path or resolve_offload_dir(self.offload_dir))
            # each swap buffer must hold the largest parameter; a block bounds it from above
            offload.update(nvme_path=path, buffer_count=max(4, 2 + self.prefetch),
                           buffer_size=max(int(1e8), biggest))
        return {
            "train_micro_batch_size_per_gpu": self.budget.batch,  # required by deepspeed.initialize
            "bf16": {"enabled": self.dtype == "bf16"},
            "fp16": {"enabled": self.dtype == "fp16"},
            "zero_optimization": {
                "stage": 3,
                "offload_param": offload,
                "stage3_param_persistence_threshold": DS_PERSISTENCE_THRESHOLD,
                "stage3_max_live_parameters": int(live),
                "stage3_max_reuse_distance": int(live),
                "stage3_prefetch_bucket_size": int(biggest * self.prefetch),
            },
        }


def _covered(name: str, dmap: dict) -> bool:
    if "" in dmap:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in dmap for i in range(1, len(parts) + 1))


def _runs(blocks: tuple[BlockPlacement, ...]) -> list[list[BlockPlacement]]:
    runs: list[list[BlockPlacement]] = []
    for b in blocks:
        last = runs[-1][-1] if runs else None
        if last and (last.component, last.placement, last.precision, last.fp32) == (
                b.component, b.placement, b.precision, b.fp32):
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs
