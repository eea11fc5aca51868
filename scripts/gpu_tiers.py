#!/usr/bin/env python
"""Offload backends on emulated VRAM tiers, measured against the planner's predictions (CUDA only).

A ~1.1B-parameter Llama-shaped model (random weights, saved once with safetensors) is planned for
each tier and loaded with each backend (resident, accelerate, streamer, deepspeed); per row: peak
allocated VRAM during a forward of batch 1 x N tokens, its latency (median after warm-up), weight
bytes moved per forward, and the plan's predicted peak VRAM and extra latency side by side.
A small card is emulated on a big one with torch.cuda.set_per_process_memory_fraction: the
caching allocator refuses beyond the tier (the CUDA context is outside that cap, so an emulated
tier is ~0.5 GiB roomier than a real card; the profiles' reserve covers that on a real one).
Every tier x backend runs in a fresh subprocess so caps, hooks and pinned memory never leak.
Note: this model (~2 GiB in bf16, ~4 in fp32) plans fully resident on 6-24 GiB tiers; offload
rows need --tiers 2,4 (or a bigger --layers). On a resident plan the streamer refuses (a row).

    python scripts/gpu_tiers.py [--tiers 6,8,12,24] [--backends resident,streamer] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing

GIB = 1024 ** 3
BACKENDS = ("resident", "accelerate", "streamer", "deepspeed")
RESERVE_GIB = {6: 0.7, 8: 0.8, 12: 1.0, 24: 1.5}  # the shipped profiles' memory.reserve_gib
# offload.backend and prefetch the plan is made with, per backend measured: "resident" must not
# offload (no fit -> a "does not fit" row); accelerate's hooks do not prefetch, so its plan's
# latency must not assume prefetch; ZeRO-3 cannot compute on the CPU, so it gets its own plan.
PLAN_AS = {"resident": ("none", 1), "accelerate": ("accelerate", 0), "streamer": ("auto", 1),
           "deepspeed": ("deepspeed", 1)}
# At batch 1 the planner computes offloaded AR layers on the CPU rather than stream them every
# token, and the streamer refuses a plan that streams nothing; so by default accelerate and the
# streamer get stream-only plans (CPU compute priced out) and measure the same placements.
STREAM_ONLY = {"accelerate", "streamer"}


def llama_config(layers: int):
    from transformers import LlamaConfig

    # tests/test_planner.py's llama_1b_config: TinyLlama-shaped, 22 layers -> ~1.1B parameters
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048)


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def save_checkpoint(path: Path, config, dtype) -> None:
    """Random weights straight from the meta model's names and shapes: no 4 GiB fp32 model built."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from edge_runtime.policy.planner import build_on_meta

    torch.manual_seed(0)
    tensors = {}
    for name, t in build_on_meta(config, LlamaForCausalLM).state_dict().items():
        # norms at one and std 0.02 (Llama's init) keep activations finite through 22 layers
        tensors[name] = (torch.ones(t.shape, dtype=dtype) if name.endswith("norm.weight")
                         else (torch.randn(t.shape) * 0.02).to(dtype))
    save_file(tensors, str(path))


def profile(tier_gib: float, plan_backend: str, prefetch: int, target: str, tokens: int):
    ns = types.SimpleNamespace  # the profile shape the planner reads (as in tests/test_planner.py)
    return ns(memory=ns(vram_gib=tier_gib, reserve_gib=RESERVE_GIB.get(tier_gib, 0.5)),
              precision=ns(dtype="auto", fp32_components=[]),
              offload=ns(backend=plan_backend, target=target, pin_memory=True, prefetch=prefetch,
                         keep_resident=[], offload_dir=None),
              quantization=ns(allowed=(), max_layer_error=0.2, force=None),
              batching=ns(max_batch=1, max_wait_ms=0),
              limits=ns(max_text_chars=tokens, max_prompt_seconds=0, queue_size=1, request_timeout_s=600))


def forward_extra_s(layout, result, cost, tokens: int) -> float:
    """Predicted extra seconds of ONE forward over ``tokens`` (a prefill): the planner prices AR
    blocks per generated token, but here a streamed block crosses PCIe once and a CPU block
    computes all tokens at once, which is the non-AR formula."""
    from edge_runtime.policy.planner import block_cost

    comps = {c.name: replace(c, autoregressive=False) for c in layout.components}
    blocks = {b.name: replace(b, autoregressive=False) for b in layout.blocks}
    return sum(block_cost(cost, blocks[p.name], comps[p.component], p.placement, tokens, 1,
                          result.prefetch, result.pin_memory).per_request_s for p in result.blocks)


def child(a: argparse.Namespace) -> dict:
    """One tier x backend in this (fresh) process; tier 0 = the uncapped resident baseline."""
    import torch
    from transformers import LlamaForCausalLM

    from edge_runtime.runtime.backends import BackendError, LoadRequest, load_model
    from edge_runtime.policy.planner import CostModel, PlanError, compute_budget, layout_from_config, plan

    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).total_memory
    row: dict = {"tier_gib": a.tier, "backend": a.backend}
    if a.tier == 0:  # the baseline also measures this machine's rates for the other rows' plans
        from edge_runtime.policy import bandwidth

        row["bandwidth"] = bandwidth.measure(disk_dir=Path(a.workdir)).to_dict()
    else:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.tier * GIB / total), dev)
    config, dtype = llama_config(a.layers), torch_dtype(a.dtype)
    layout = layout_from_config(config, LlamaForCausalLM, dtype=dtype)
    cost = CostModel(h2d_bytes_per_s=a.h2d, disk_bytes_per_s=a.disk,
                     **({"cpu_flops": 1.0} if a.backend in STREAM_ONLY and not a.cpu_compute else {}))
    prof = profile(a.tier or total / GIB, *PLAN_AS[a.backend], a.target, a.tokens)
    try:
        result = plan(layout, prof, compute_budget(prof, layout, max_batch=1, max_tokens=a.tokens), cost)
    except PlanError as exc:
        return {**row, "status": "does not fit (plan)", "error": str(exc)}
    row.update(placements=dict(Counter(b.placement for b in result.blocks)), plan_backend=result.backend,
               pred_peak_bytes=result.peak_vram_bytes, pred_extra_s=result.extra_latency_s,
               pred_extra_per_token_s=result.extra_latency_per_token_s,
               pred_forward_extra_s=forward_extra_s(layout, result, cost, a.tokens))
    loaded = None
    try:
        offload = Path(a.workdir) / f"offload-{a.tier}-{a.backend}"
        request = LoadRequest(build=lambda: LlamaForCausalLM(config), checkpoint=Path(a.checkpoint),
                              plan=result, device=dev, dtype=dtype, offload_dir=offload,
                              no_split_modules=("LlamaDecoderLayer",))
        t0 = time.perf_counter()
        loaded = load_model(request, a.backend)
        row["load_s"] = time.perf_counter() - t0
        ids = torch.randint(0, config.vocab_size, (1, a.tokens), device=dev)

        def forward() -> float:
            torch.cuda.synchronize(dev)
            start = time.perf_counter()
            with torch.inference_mode():  # one prefill; no KV cache object through the hooks (~6 MB)
                loaded.model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize(dev)
            return time.perf_counter() - start

        for _ in range(a.warmup):  # also teaches the streamer the block order
            forward()
        torch.cuda.reset_peak_memory_stats(dev)
        loaded.stats.reset()
        times = [forward() for _ in range(a.repeats)]
        row.update(status="ok", latency_s=statistics.median(times), latencies_s=times,
                   peak_bytes=torch.cuda.max_memory_allocated(dev),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(dev),
                   bytes_moved_per_forward=loaded.stats.bytes_moved // a.repeats,
                   waits_s_per_forward=loaded.stats.waits_s / a.repeats)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="does not fit (OOM)", error=str(exc).splitlines()[0])
    except BackendError as exc:  # e.g. the streamer given a plan that streams nothing
        row.update(status="refused", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row, not the end
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if loaded is not None:
            loaded.close()
    return row


def run_child(a: argparse.Namespace, tier: int, backend: str, h2d: float, disk: float) -> dict:
    out = Path(a.workdir) / f"row-{tier}-{backend}.json"
    cmd = [sys.executable, __file__, "--child", "--tier", str(tier), "--backend", backend,
           "--h2d", str(h2d), "--disk", str(disk), "--checkpoint", str(a.checkpoint), "--workdir", a.workdir,
           "--layers", str(a.layers), "--dtype", a.dtype, "--tokens", str(a.tokens), "--target", a.target,
           "--warmup", str(a.warmup), "--repeats", str(a.repeats), "--result", str(out)]
    cmd += ["--cpu-compute"] if a.cpu_compute else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout)
    except subprocess.TimeoutExpired:
        return {"tier_gib": tier, "backend": backend, "status": f"timed out after {a.child_timeout} s"}
    if proc.returncode != 0 or not out.exists():  # hard crash (segfault, killed): keep the reason
        return {"tier_gib": tier, "backend": backend, "status": f"crashed (exit {proc.returncode})",
                "error": proc.stderr[-800:]}
    return json.loads(out.read_text())


def table(rows: list[dict], baseline_s: float | None) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
    gb = lambda v: "-" if v is None else f"{v / GIB:.2f}"  # noqa: E731
    lines = ["| tier | backend | placements | pred peak GiB | peak GiB (reserved) | pred +ms/forward "
             "| pred +ms/req | latency ms | +ms vs resident | MB moved/forward | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r.get("latency_s")
        extra = None if lat is None or baseline_s is None else lat - baseline_s
        where = ", ".join(f"{n} {p}" for p, n in sorted(r.get("placements", {}).items())) or "-"
        moved = r.get("bytes_moved_per_forward")
        lines.append(f"| {r['tier_gib'] or 'none'} | {r['backend']} | {where} | {gb(r.get('pred_peak_bytes'))} "
                     f"| {gb(r.get('peak_bytes'))} ({gb(r.get('peak_reserved_bytes'))}) "
                     f"| {ms(r.get('pred_forward_extra_s'))} | {ms(r.get('pred_extra_s'))} | {ms(lat)} "
                     f"| {ms(extra)} | {'-' if moved is None else f'{moved / 1e6:.0f}'} | {r['status']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", default="6,8,12,24", help="VRAM tiers in GiB, comma-separated")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, from " + ", ".join(BACKENDS))
    p.add_argument("--layers", type=int, default=96,
                   help="decoder layers (22: ~1.1B parameters; 96: ~4.3B, 8.5 GiB in bf16, which the 6 and 8 GiB tiers must offload)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--tokens", type=int, default=256, help="sequence length of the forward (batch 1)")
    p.add_argument("--target", choices=("cpu", "disk"), default="cpu", help="where offloaded weights wait")
    p.add_argument("--cpu-compute", action="store_true",
                   help="let accelerate/streamer plans compute offloaded layers on the CPU (the planner's batch-1 choice)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child-timeout", type=int, default=900, help="seconds per tier x backend")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_results" / "gpu_tiers.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one row, in its own process
    for hidden, kind in (("--tier", int), ("--h2d", float), ("--disk", float), ("--backend", str),
                         ("--checkpoint", str), ("--workdir", str), ("--result", str)):
        p.add_argument(hidden, type=kind, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        Path(a.result).write_text(json.dumps(child(a)))
        return 0

    tiers, backends = [int(t) for t in a.tiers.split(",")], [b.strip() for b in a.backends.split(",")]
    if set(backends) - set(BACKENDS):
        p.error(f"unknown backend(s) {sorted(set(backends) - set(BACKENDS))}; choose from {', '.join(BACKENDS)}")
    import torch

    if not torch.cuda.is_available():
        print("gpu_tiers: needs a CUDA GPU; nothing measured")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_tiers-") as work:
        a.workdir, a.checkpoint = work, Path(work) / "llama.safetensors"
        t0 = time.perf_counter()
        save_checkpoint(a.checkpoint, llama_config(a.layers), torch_dtype(a.dtype))
        print(f"checkpoint {a.checkpoint.stat().st_size / GIB:.2f} GiB written in {time.perf_counter() - t0:.0f} s")
        base = run_child(a, 0, "resident", 22e9, 1.5e9)
        bw = base.get("bandwidth") or {}
        h2d = bw.get("h2d_pinned_bytes_per_s") or 22e9
        # a read served from the page cache (tmpfs) is RAM speed: keep the SSD default then
        disk = (bw.get("disk_cache_dropped") and bw.get("disk_read_bytes_per_s")) or 1.5e9
        print(f"measured host->device {h2d / 1e9:.1f} GB/s pinned, disk read {disk / 1e9:.2f} GB/s; "
              f"resident baseline: {base['status']}")
        rows = []
        for tier in tiers:
            for backend in backends:
                rows.append(run_child(a, tier, backend, h2d, disk))
                why = (rows[-1].get("error") or "").strip().splitlines()[-1:] or [""]
                print(f"  {tier} GiB {backend}: {rows[-1]['status']} {why[0][:160]}", flush=True)
    baseline_s = base.get("latency_s")
    print(f"\n{torch.cuda.get_device_name(0)}; Llama {a.layers} layers {a.dtype}, batch 1 x {a.tokens} tokens, "
          f"offload target {a.target}; latency median of {a.repeats}\n")
    print(table([base, *rows], baseline_s))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in ("tiers", "backends", "layers", "dtype", "tokens", "target",
                                          "cpu_compute", "warmup", "repeats")}
    a.output.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                    "settings": settings, "baseline": base, "rows": rows}, indent=2))
    print(f"\nwrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
