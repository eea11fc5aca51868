"""Choose each quantizable block's precision, then place: the least lossy plan that fits the tier,
then the fastest.

A plan *fits* when every per-frame block that computes (autoregressive, with weights it multiplies)
is on the GPU: such a block streamed or computed on the CPU costs its penalty on every frame.
Blocks run once per request or only in the prefill may stream (their cost is paid once).

Candidates, from least to most lossy (only blocks of components a family marks ``quantizable``, only
the precisions the profile allows within its quality budget ``quantization.max_layer_error``):
  no block quantized; then 1, 2, ... blocks int8 (the largest first); then every such block int8
  and 1, 2, ... of them int4.
Each candidate is placed by placement.place (which fills the rest of the card by benefit per byte,
i.e. the fastest placement of that candidate). The first candidate that fits wins. When none fits,
the most compressed candidate is placed (degrade, don't die: some per-frame blocks then compute on
the CPU or stream) and a note names the VRAM a fit needs. ``quantization.force`` skips the search.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from edge_runtime.policy.planner.budget import Budget
from edge_runtime.policy.planner.cost import CostModel
from edge_runtime.policy.planner.layout import Block, ModelLayout, gib
from edge_runtime.policy.planner.placement import place
from edge_runtime.policy.planner.plan import Plan, PlanError
from edge_runtime.policy.quantization import (PRECISIONS, PREDICTED_LAYER_ERROR, int4_quantizable,
                                              quantized_linear_bytes)

if TYPE_CHECKING:
    from edge_runtime.policy.schema import Profile


def plan(layout: ModelLayout, profile: Profile, budget: Budget, cost_model: CostModel | None = None,
         target: str | None = None) -> Plan:
    """Precisions and placement of every block of ``layout`` within ``budget`` (module docstring)."""
    result = _choose(layout, profile, budget, cost_model, target)
    return dataclasses.replace(result, fits=fits(result, layout))


def _choose(layout, profile, budget, cost_model, target) -> Plan:
    cost = cost_model or CostModel()
    quant = profile.quantization
    blocks = quantizable_blocks(layout)
    zero_copy = _uses_zero3(profile, target)
    if quant.force:
        if not blocks:
            return _note(place(layout, profile, budget, cost, target),
                         f"quantization.force {quant.force}: {layout.model_name} has no quantizable layers")
        if zero_copy:
            raise PlanError(f"quantization.force {quant.force} does not work with DeepSpeed ZeRO-3 (it cannot "
                            "partition quantized weights): use offload.backend auto, streamer or accelerate "
                            "with target cpu or disk, or force: null")
        chosen = {b.name: quant.force for b in blocks}
        return _place(layout, profile, budget, cost, target, chosen)
    levels = [p for p in PRECISIONS if p in quant.allowed and PREDICTED_LAYER_ERROR[p] <= quant.max_layer_error]
    if budget.cpu_only or not blocks or not levels or zero_copy:
        result = place(layout, profile, budget, cost, target)
        if zero_copy and blocks and levels and not fits(result, layout):
            result = _note(result, "DeepSpeed ZeRO-3 cannot partition quantized weights: no layer was quantized")
        return result
    candidates = _candidates(blocks, levels)
    best, first_error = None, None
    try:
        unquantized = place(layout, profile, budget, cost, target)
        if fits(unquantized, layout):
            return unquantized
    except PlanError as exc:
        first_error = exc
    lo, hi = 1, len(candidates) - 1
    while lo <= hi:  # candidates shrink monotonically: the first that fits, by bisection
        mid = (lo + hi) // 2
        try:
            attempt = _place(layout, profile, budget, cost, target, candidates[mid])
        except PlanError as exc:  # too small even to stream (the minimum): more compression may help
            first_error = first_error or exc
            lo = mid + 1
            continue
        if fits(attempt, layout):
            best, hi = attempt, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    try:
        fallback = _place(layout, profile, budget, cost, target, candidates[-1])
    except PlanError as exc:
        raise (first_error or exc) from None
    return _note(fallback, _minimum_note(layout, budget, profile, candidates[-1], fallback))


def quantizable_blocks(layout: ModelLayout) -> list[Block]:
    """Blocks whose Linear weights may be quantized: autoregressive blocks of components a family
    marks quantizable (prefill-only and once-per-request blocks gain nothing per frame)."""
    return [b for c in layout.components if c.quantizable and c.autoregressive
            for b in c.blocks if b.linear_shapes]


def fits(result: Plan, layout: ModelLayout) -> bool:
    """Every per-frame block that computes is on the GPU (embedding lookups may sit elsewhere)."""
    if result.cpu_only:
        return True
    computing = _per_frame_computing(layout)
    return all(b.placement == "gpu" for b in result.blocks if b.name in computing)


def quantized_layout(layout: ModelLayout, precisions: dict[str, str]) -> ModelLayout:
    """``layout`` with each block in ``precisions`` sized as stored quantized (policy/quantization.py)."""
    if not precisions:
        return layout
    comps = []
    for c in layout.components:
        blocks = tuple(_resized(b, precisions[b.name]) if b.name in precisions else b for b in c.blocks)
        comps.append(dataclasses.replace(c, blocks=blocks))
    return dataclasses.replace(layout, components=tuple(comps))


def quantized_block_bytes(block: Block, precision: str) -> int:
    """A block's bytes with its Linear weights at ``precision`` (int4 layers too narrow for a group
    stay int8, as the runtime stores them)."""
    elem = block.compute_bytes
    saved = 0
    for out_features, in_features in block.linear_shapes:
        chosen = precision if precision != "int4" or int4_quantizable(in_features, out_features) else "int8"
        saved += out_features * in_features * elem - quantized_linear_bytes(out_features, in_features, chosen, elem)
    return block.bytes - saved


def _resized(block: Block, precision: str) -> Block:
    return dataclasses.replace(block, bytes=quantized_block_bytes(block, precision))


def _place(layout, profile, budget, cost, target, precisions) -> Plan:
    result = place(quantized_layout(layout, precisions), profile, budget, cost, target, precisions)
    if not precisions:
        return result
    saved = sum(b.bytes for b in layout.blocks) - sum(b.bytes for b in result.blocks)
    return _note(result, f"quantizing {len(precisions)} LM blocks saves {gib(saved):.2f} GiB of weights")


def _candidates(blocks: list[Block], levels: list[str]) -> list[dict[str, str]]:
    order = sorted(blocks, key=lambda b: (-b.bytes, b.index, b.name))  # most bytes saved first
    out: list[dict[str, str]] = [{}]
    base: dict[str, str] = {}
    for level in levels:
        for i in range(1, len(order) + 1):
            out.append({**base, **{b.name: level for b in order[:i]}})
        base = out[-1]
    return out


def _per_frame_computing(layout: ModelLayout) -> set[str]:
    return {b.name for b in layout.blocks if b.autoregressive and b.compute_params > 0}


def _uses_zero3(profile: Profile, target: str | None) -> bool:
    backend = profile.offload.backend
    return backend == "deepspeed" or (backend == "auto" and (target or profile.offload.target) == "nvme")


def _note(result: Plan, text: str) -> Plan:
    return dataclasses.replace(result, notes=(*result.notes, text))


def _minimum_note(layout: ModelLayout, budget: Budget, profile: Profile, precisions: dict[str, str],
                  result: Plan) -> str:
    """What a fit would need: every computing per-frame block resident at the most compressed allowed
    precision, its KV cache, activations, the reserve and the streaming buffers of the rest."""
    sized = quantized_layout(layout, precisions)
    per_frame = sum(b.bytes for b in sized.blocks if b.autoregressive and b.compute_params)
    others = [b.bytes for b in sized.blocks if not b.autoregressive and b.compute_params]  # tables sit on the CPU
    inflight = (1 + profile.offload.prefetch) * max(others, default=0)
    need = per_frame + budget.kv_cache_bytes + budget.activation_bytes + budget.reserve_bytes + inflight
    computing = _per_frame_computing(layout)
    off = [b for b in result.blocks if b.name in computing and b.placement != "gpu"]
    level = "bf16" if not precisions else "/".join(sorted(set(precisions.values()), key=PRECISIONS.index))
    return (f"does not fit {gib(budget.vram_bytes):.1f} GiB: its per-frame blocks ({level}) need about "
            f"{gib(need):.2f} GiB of VRAM (weights {gib(per_frame):.2f}, KV {gib(budget.kv_cache_bytes):.2f}, "
            f"activations {gib(budget.activation_bytes):.2f}, buffers {gib(inflight):.2f}, reserve "
            f"{gib(budget.reserve_bytes):.2f}); this plan runs {len(off)} of them off the GPU, paying "
            f"{1e3 * result.extra_latency_per_token_s:.1f} ms per frame")
