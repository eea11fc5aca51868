"""Predicted extra latency of a placement: a few figures and simple arithmetic, estimates only.

Per block, relative to keeping it resident on the GPU:

* ``stream:*`` non-AR (encoders, codecs, prefill stages): the weights move in once per request.
  With prefetch (the next block copied while this one computes) only the part of the copy not
  hidden by compute costs: max(0, transfer - gpu_compute). Without prefetch the whole transfer.
* ``stream:*`` AR: the same transfer is paid PER TOKEN (per forward pass, and CSM's depth
  decoder makes several passes per frame). 3 GB over PCIe 4.0 is ~0.14 s every token — why AR
  blocks stay resident or compute on the CPU. Prompt tokens are counted as steps too (an upper
  bound: prefill is really one pass).
* ``cpu``: the block computes on the CPU: cpu_compute - gpu_compute, per request for non-AR,
  per token for AR. Moving the small hidden state across PCIe is ignored.
* compute = 2 FLOPs per parameter per token per sequence (a matmul's multiply-add); embedding
  tables count none (a lookup reads one row), so embeddings go to the CPU first; convolutional
  codecs do far more work per parameter, so their compute is underestimated and the streaming
  penalty overestimated (the safe side).
Rates are *effective* (achieved) figures, not datasheet peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_runtime.policy.planner.layout import Block, ComponentLayout

PLACEMENTS = ("gpu", "stream:cpu", "stream:disk", "stream:nvme", "cpu")


@dataclass(frozen=True)
class CostModel:
    # Host->device, pinned, PCIe 4.0 x16 (FACTS.md: 21-24 GB/s; 3.0 ~11-13, 5.0 ~56). Replace it
    # with the measured figure (`edge-runtime doctor --bandwidth`) via with_measured_h2d().
    h2d_bytes_per_s: float = 22e9
    # Weights read from an offload folder on an SSD (accelerate's disk offload, safetensors mmap).
    # `doctor --bandwidth` measures it too; edge_runtime.policy.bandwidth.cost_model_from_measurement()
    # applies both measured figures.
    disk_bytes_per_s: float = 1.5e9
    # Effective bf16/fp16 throughput of a mid-range consumer GPU (about half its tensor peak).
    gpu_flops: float = 20e12
    # Effective CPU throughput for inference (small-batch decode is memory-bound: ~1 FLOP/byte).
    cpu_flops: float = 1e11
    # DeepSpeed's async-io reads straight from an NVMe drive.
    nvme_bytes_per_s: float = 3e9
    # Pageable (unpinned) host memory copies at roughly half the pinned rate.
    unpinned_factor: float = 0.5

    def with_measured_h2d(self, bytes_per_s: float) -> "CostModel":
        """The same model with a measured host->device bandwidth."""
        if bytes_per_s <= 0:
            raise ValueError("measured bandwidth must be positive")
        return replace(self, h2d_bytes_per_s=float(bytes_per_s))

    def with_measured_disk(self, bytes_per_s: float) -> "CostModel":
        """The same model with a measured offload-folder read bandwidth (page cache dropped)."""
        if bytes_per_s <= 0:
            raise ValueError("measured bandwidth must be positive")
        return replace(self, disk_bytes_per_s=float(bytes_per_s))

    def transfer_s(self, n_bytes: int, source: str, pinned: bool = True) -> float:
        """Seconds to bring ``n_bytes`` of weights onto the GPU from ``source`` (cpu|disk|nvme);
        storage reads and the PCIe copy are taken as sequential (accelerate does not overlap them)."""
        h2d = self.h2d_bytes_per_s * (1.0 if pinned else self.unpinned_factor)
        seconds = n_bytes / h2d
        if source == "disk":
            seconds += n_bytes / self.disk_bytes_per_s
        elif source == "nvme":
            seconds += n_bytes / self.nvme_bytes_per_s
        elif source != "cpu":
            raise ValueError(f"unknown offload source {source!r}")
        return seconds

    def gpu_s(self, flops: float) -> float:
        return flops / self.gpu_flops

    def cpu_s(self, flops: float) -> float:
        return flops / self.cpu_flops


@dataclass(frozen=True)
class BlockCost:
    per_request_s: float  # extra seconds per request (AR: per_token_s x request tokens)
    per_token_s: float  # extra seconds per generated token (AR blocks only; 0 otherwise)


def block_cost(cost: CostModel, block: Block, component: ComponentLayout, placement: str,
               tokens: int, batch: int, prefetch: int, pinned: bool = True) -> BlockCost:
    """Extra latency of ``placement`` for one block vs. resident (see the module docstring)."""
    if placement == "gpu":
        return BlockCost(0.0, 0.0)
    if block.autoregressive:
        step_flops = 2.0 * block.compute_params * batch  # one token per sequence per pass
        per_pass = _pass_cost(cost, block, placement, step_flops, prefetch, pinned)
        per_token = per_pass * component.passes_per_token
        return BlockCost(per_token * tokens, per_token)
    flops = 2.0 * block.compute_params * component.tokens(tokens) * batch
    return BlockCost(_pass_cost(cost, block, placement, flops, prefetch, pinned), 0.0)


def _pass_cost(cost: CostModel, block: Block, placement: str, flops: float,
               prefetch: int, pinned: bool) -> float:
    gpu = cost.gpu_s(flops)
    if placement == "cpu":
        return max(0.0, cost.cpu_s(flops) - gpu)
    if placement.startswith("stream:"):
        transfer = cost.transfer_s(block.bytes, placement.split(":", 1)[1], pinned)
        return max(0.0, transfer - gpu) if prefetch > 0 else transfer
    raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
