"""Decide where every block goes. Greedy, deterministic, and checked against its own accounting.

Order of claims on VRAM (each unit placed whole; blocks sharing a tied tensor form one unit):
  1. ``offload.keep_resident`` components: resident or PlanError naming what is missing;
  2. autoregressive units, most expensive-to-offload per byte first: they pay per token;
  3. the rest, by benefit per byte (the latency saved by keeping them resident).
Whatever is left out streams from ``offload.target`` (non-AR), or, for AR units, streams or
computes on the CPU, whichever the cost model predicts cheaper per token.

Accounting: peak VRAM = resident + (1 + prefetch) x largest streamed unit + activations
+ KV cache of AR blocks computed on the GPU; it must stay within VRAM - reserve.
When two streamed copies do not fit, prefetch is lowered before anything fails.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from typing import TYPE_CHECKING

from edge_runtime.policy.planner.budget import Budget, batch_bound
from edge_runtime.policy.planner.cost import CostModel, block_cost
from edge_runtime.policy.planner.layout import Block, ModelLayout, gib
from edge_runtime.policy.planner.plan import BlockPlacement, Plan, PlanError

if TYPE_CHECKING:  # the typed profile: policy/schema.py checks every value
    from edge_runtime.policy.schema import Profile

TARGETS = ("cpu", "disk", "nvme")
BACKENDS = ("auto", "none", "accelerate", "streamer", "deepspeed")


@dataclass
class _Unit:
    blocks: list[Block]
    index: int
    keep: bool = False
    alt: str = ""  # where it goes if not resident
    benefit: float = 0.0  # seconds per request saved by keeping it resident

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.blocks)

    @property
    def ar(self) -> bool:
        return any(b.autoregressive for b in self.blocks)


def place(layout: ModelLayout, profile: Profile, budget: Budget, cost_model: CostModel | None = None,
          target: str | None = None, precisions: dict[str, str] | None = None) -> Plan:
    """Place every block of ``layout`` within ``budget`` (see the module docstring). ``layout`` already
    carries the sizes of the blocks ``precisions`` quantizes (precision.quantized_layout); the plan
    records each block's precision and predicted error."""
    cost = cost_model or CostModel()
    offload = profile.offload
    target = target or offload.target
    backend = offload.backend
    if target not in TARGETS:
        raise PlanError(f"offload.target must be one of {TARGETS}, not {target!r}")
    if backend not in BACKENDS:
        raise PlanError(f"offload.backend must be one of {BACKENDS}, not {backend!r}")
    if backend in ("accelerate", "streamer") and target == "nvme":
        raise PlanError(f"{backend} offloads to cpu or disk; offload.target nvme needs backend deepspeed or auto")
    opts = dict(prefetch=offload.prefetch, pinned=offload.pin_memory)
    notes = list(layout.notes)
    comps = {c.name: c for c in layout.components}
    keep = list(offload.keep_resident)
    known = [k for k in keep if k in comps or any(_under(b.name, k) for b in layout.blocks)]
    if len(known) < len(keep):
        notes.append(f"keep_resident ignores names this model lacks: {sorted(set(keep) - set(known))}")
    known += [c.name for c in layout.components if c.stays_resident and c.name not in known]

    if budget.cpu_only:
        notes.append("CPU-only profile: every block computes on the CPU")
        placed = {b.name: "cpu" for b in layout.blocks}
        return _build(layout, profile, budget, cost, placed, "resident", target, 0, 0, 0, notes, opts,
                      precisions)

    units = _units(layout, known)
    _check_minimum(units, layout, budget)
    deepspeed = backend == "deepspeed" or (backend == "auto" and target == "nvme")
    _score(units, layout, budget, cost, target, opts, allow_cpu=not deepspeed)
    if deepspeed:
        notes.append("ZeRO-3 cannot compute a block on the CPU: AR blocks left out of VRAM stream")

    usable = budget.usable_bytes
    attempt = None
    for prefetch in range(opts["prefetch"], -1, -1):
        attempt = _greedy(units, budget, prefetch, allow_offload=backend != "none")
        if attempt[0] <= usable:
            break
        if not deepspeed and any(u.ar and u.alt.startswith("stream:") for u in units):
            # a streamed AR unit keeps its KV cache on the GPU; computing on the CPU frees it
            for u in units:
                if u.ar and u.alt.startswith("stream:"):
                    u.alt = "cpu"
            attempt = _greedy(units, budget, prefetch, allow_offload=backend != "none")
            if attempt[0] <= usable:
                break
    need, resident, prefetch = attempt
    if need > usable:
        _fail(units, budget, need, backend, layout)
    if prefetch < opts["prefetch"]:
        notes.append(f"prefetch lowered from {opts['prefetch']} to {prefetch}: "
                     f"{1 + opts['prefetch']} copies of the largest streamed block do not fit")

    placed = {}
    for u in units:
        where = "gpu" if id(u) in resident else u.alt
        for b in u.blocks:
            placed[b.name] = where
    offloaded = any(p != "gpu" for p in placed.values())
    if backend == "auto":
        backend = "resident" if not offloaded else ("deepspeed" if deepspeed else "streamer")
    elif backend == "none":
        backend = "resident"
    streamed = [u for u in units if placed[u.blocks[0].name].startswith("stream:")]
    if not streamed:
        prefetch = 0
    inflight = (1 + prefetch) * max((u.bytes for u in streamed), default=0)
    if backend == "accelerate" and streamed and prefetch:
        notes.append("accelerate's own hooks do not prefetch: the latency figures assume the "
                     "runtime's prefetching streamer (offload.backend streamer or auto)")
    streamed_ar = [b.name for u in streamed for b in u.blocks if b.autoregressive and b.bytes]
    if streamed_ar:
        notes.append(f"{len(streamed_ar)} AR block(s) stream and pay their transfer on every token")
    return _build(layout, profile, budget, cost, placed, backend, target, prefetch, inflight,
                  usable, notes, opts, precisions)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _check_minimum(units: list[_Unit], layout: ModelLayout, budget: Budget) -> None:
    """Largest placement unit (a block, or blocks tied together) + activations + reserve."""
    largest = max(units, key=lambda u: (u.bytes, -u.index))
    minimum = budget.reserve_bytes + budget.activation_bytes + largest.bytes
    if budget.vram_bytes < minimum:
        names = "+".join(repr(b.name) for b in largest.blocks if b.bytes) or repr(largest.blocks[0].name)
        raise PlanError(
            f"{gib(budget.vram_bytes):.2f} GiB of VRAM is below the minimum of {gib(minimum):.2f} GiB "
            f"for {layout.model_name}: largest block {names} {gib(largest.bytes):.2f} GiB + "
            f"activations {gib(budget.activation_bytes):.2f} GiB (batch {budget.batch} x "
            f"{budget.tokens} tokens) + reserve {gib(budget.reserve_bytes):.2f} GiB. Use a bigger "
            "tier, a smaller batch or text limit, or the CPU profile")


def _units(layout: ModelLayout, keep: list[str]) -> list[_Unit]:
    """Group blocks tied by shared tensors (union-find), in layout order."""
    blocks = layout.blocks
    parent = {b.name: b.name for b in blocks}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for b in blocks:
        for other in b.tied_with:
            if other in parent:
                parent[root(other)] = root(b.name)
    groups: dict[str, list[Block]] = {}
    for b in blocks:
        groups.setdefault(root(b.name), []).append(b)
    units = []
    for i, members in enumerate(groups.values()):
        kept = any(b.component in keep or any(_under(b.name, k) for k in keep) for b in members)
        units.append(_Unit(blocks=members, index=i, keep=kept))
    return units


def _score(units, layout, budget, cost, target, opts, allow_cpu: bool) -> None:
    """Choose each unit's off-GPU alternative and the benefit of keeping it resident."""
    comps = {c.name: c for c in layout.components}

    def unit_cost(u, where):
        return [block_cost(cost, b, comps[b.component], where, budget.tokens, budget.batch,
                           opts["prefetch"], opts["pinned"]) for b in u.blocks]

    stream = f"stream:{target}"
    for u in units:
        alt = stream
        costs = unit_cost(u, stream)
        if u.ar and allow_cpu:
            on_cpu = unit_cost(u, "cpu")
            # per token: streaming pays the transfer every token, the CPU pays compute every token
            if sum(c.per_token_s for c in on_cpu) <= sum(c.per_token_s for c in costs):
                alt, costs = "cpu", on_cpu
        elif allow_cpu and not any(b.compute_params for b in u.blocks):
            # a table only looked up (a prefill-only text embedding): the CPU reads one row per token,
            # streaming would move the whole table in and hold a GPU buffer for it
            alt, costs = "cpu", unit_cost(u, "cpu")
        u.alt = alt
        u.benefit = sum(c.per_request_s for c in costs)


def _need(units, resident: set[int], budget: Budget, prefetch: int) -> int:
    streamed = [u for u in units if id(u) not in resident and u.alt.startswith("stream:")]
    inflight = (1 + prefetch) * max((u.bytes for u in streamed), default=0)
    kv = sum(budget.kv_by_block.get(b.name, 0)
             for u in units if id(u) in resident or u.alt.startswith("stream:") for b in u.blocks)
    weights = sum(u.bytes for u in units if id(u) in resident)
    return weights + inflight + kv + budget.activation_bytes


def _greedy(units, budget: Budget, prefetch: int, allow_offload: bool):
    """(VRAM needed, resident unit ids, prefetch) for keep -> AR -> rest filling."""
    if not allow_offload:
        everything = {id(u) for u in units}
        return _need(units, everything, budget, 0), everything, 0
    resident = {id(u) for u in units if u.keep}
    need = _need(units, resident, budget, prefetch)
    if need > budget.usable_bytes:
        return need, resident, prefetch

    def key(u):  # most seconds saved per byte first; layout order breaks ties (deterministic)
        return (-(u.benefit / u.bytes) if u.bytes else float("-inf"), u.index)

    order = sorted((u for u in units if not u.keep and u.ar), key=key)
    order += sorted((u for u in units if not u.keep and not u.ar), key=key)
    for u in order:
        trial = resident | {id(u)}
        trial_need = _need(units, trial, budget, prefetch)
        if trial_need <= budget.usable_bytes:
            resident, need = trial, trial_need
    return need, resident, prefetch


def _fail(units, budget: Budget, need: int, backend: str, layout: ModelLayout) -> None:
    missing = need - budget.usable_bytes
    kept = sorted({b.component for u in units if u.keep for b in u.blocks})
    if backend == "none":
        raise PlanError(f"offload.backend is none but {layout.model_name} needs {gib(need):.2f} GiB "
                        f"of the {gib(budget.usable_bytes):.2f} GiB usable ({gib(missing):.2f} GiB "
                        "missing): allow offload (backend auto) or use a bigger tier")
    if kept:
        kept_bytes = sum(u.bytes for u in units if u.keep)
        raise PlanError(f"keep_resident {kept} ({gib(kept_bytes):.2f} GiB) does not fit: "
                        f"{gib(missing):.2f} GiB ({missing} bytes) missing of "
                        f"{gib(budget.usable_bytes):.2f} GiB usable once activations, KV cache and "
                        "streaming buffers are counted")
    raise PlanError(f"{layout.model_name} does not fit: {gib(missing):.2f} GiB missing of "
                    f"{gib(budget.usable_bytes):.2f} GiB usable (KV cache of streamed AR blocks "
                    f"and buffers); lower batching.max_batch or limits.max_text_chars")


def _build(layout, profile, budget, cost, placed, backend, target, prefetch, inflight,
           usable, notes, opts, precisions) -> Plan:
    from edge_runtime.policy.quantization import PREDICTED_LAYER_ERROR

    precisions = precisions or {}
    comps = {c.name: c for c in layout.components}
    rows, kv_gpu = [], 0
    for b in layout.blocks:
        where = placed[b.name]
        kv = budget.kv_by_block.get(b.name, 0)
        if where != "cpu" and not budget.cpu_only:
            kv_gpu += kv
        c = block_cost(cost, b, comps[b.component], where, budget.tokens, budget.batch,
                       prefetch, opts["pinned"]) if not budget.cpu_only else None
        rows.append(BlockPlacement(
            name=b.name, component=b.component, index=b.index, placement=where, bytes=b.bytes,
            params=b.params, autoregressive=b.autoregressive, kv_bytes=kv,
            extra_s=c.per_request_s if c else 0.0, extra_per_token_s=c.per_token_s if c else 0.0,
            submodel=b.submodel, precision=precisions.get(b.name, ""),
            predicted_error=PREDICTED_LAYER_ERROR.get(precisions.get(b.name, ""), 0.0),
            fp32=b.compute_bytes == 4 and layout.dtype != torch.float32))
    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(layout.dtype), "fp32")
    result = Plan(model_name=layout.model_name, dtype=dtype, blocks=tuple(rows), backend=backend,
                  target=target, prefetch=prefetch, pin_memory=opts["pinned"],
                  offload_dir=profile.offload.offload_dir, budget=budget,
                  inflight_bytes=inflight, kv_gpu_bytes=kv_gpu, notes=tuple(notes))
    # The plan's own accounting must hold; anything else is a planner bug, not a user error.
    if not budget.cpu_only and result.peak_vram_bytes > usable:
        raise AssertionError(f"planner bug: peak {result.peak_vram_bytes} > usable {usable}")
    return replace(result, max_batch=batch_bound(budget, result.resident_bytes + inflight, kv_gpu))
