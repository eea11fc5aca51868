#!/usr/bin/env python
"""The voice-cloning models at their default (published) sizes, planned for every GPU tier.

Everything is computed on the meta device from folders holding only the published config files
(scripts/published_configs.py: transformers' default configs, codecs included): no weights, no
download, the same code path as `edge-runtime plan --model DIR`. For each model: bytes per component in bf16 (fp16 is the same size; codecs stay fp32),
then the plan the shipped 6/8/12/24 GB profiles give (bf16, as on an Ampere-class card): what is
resident, streamed or computed on the CPU, predicted peak VRAM, and the predicted extra latency
of the offload per request and per generated frame. Prints markdown (the README's table) and
writes JSON (default bench_results/model_table.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# (label, shipped profile, overrides): the four tiers, plus a 4 GB card (auto-selection gives it
# the 6gb profile with a warning) to show what offloading costs when it is needed.
TIERS = (("4gb", "6gb", ("memory.vram_gib=4", "memory.reserve_gib=0.5")), ("6gb", "6gb", ()),
         ("8gb", "8gb", ()), ("12gb", "12gb", ()), ("24gb", "24gb", ()))
# bf16/fp16 on Volta and newer; fp32 on older cards (compute capability < 7.0, e.g. GTX 10xx)
DTYPES = (("bf16", "bfloat16"), ("fp32", "float32"))


def summarise(result) -> str:
    """Placements per component, e.g. 'backbone gpu, depth_decoder cpu 3/4'."""
    per: dict[str, dict[str, int]] = {}
    for b in result.blocks:
        per.setdefault(b.component, {}).setdefault(b.placement, 0)
        per[b.component][b.placement] += 1
    parts = []
    for comp, where in per.items():
        total = sum(where.values())
        if len(where) == 1:
            parts.append(f"{comp} {next(iter(where))}")
        else:
            parts.append(f"{comp} " + ", ".join(f"{p} {n}/{total}" for p, n in where.items()))
    return "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "model_table.json")
    args = ap.parse_args()

    import tempfile

    import torch

    from edge_runtime.models import registry
    from edge_runtime.policy.planner.layout import gib
    from published_configs import NAMES, write_all

    sizes, plans, data = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for key, folder in write_all(Path(tmp)).items():
            name = NAMES[key]
            source = registry.resolve(str(folder), weights=False)  # config files only
            layout = source.family.layout(source, torch.bfloat16)
            for c in layout.components:
                params = sum(b.params for b in c.blocks)
                sizes.append(f"| {name} | {c.name} | {c.kind} | {params / 1e6:.1f}M | "
                             f"{gib(c.bytes):.3f}{' (fp32)' if c.fp32 else ''} |")
            sizes.append(f"| {name} | **total** | | {layout.total_params / 1e6:.1f}M | "
                         f"**{gib(layout.total_bytes):.2f}** |")
            entry = {"model": name, "total_bytes": layout.total_bytes,
                     "components": {c.name: c.bytes for c in layout.components}, "plans": {}}
            for dtype_name, dtype in DTYPES:
                typed = layout if dtype_name == "bf16" else source.family.layout(source, getattr(torch, dtype))
                for tier, base, overrides in TIERS:
                    _plan_row(name, typed, tier, base, overrides, dtype_name, plans, entry)
            data.append(entry)
    _print(sizes, plans, data, args.out)
    return 0


def _plan_row(name, layout, tier, base, overrides, dtype_name, plans, entry) -> None:
    from edge_runtime.policy.planner import PlanError, compute_budget, plan
    from edge_runtime.policy.planner.layout import gib
    from edge_runtime.policy.profiles import load_profile

    profile = load_profile(base, (*overrides, f"precision.dtype={dtype_name}"))
    key = f"{tier}/{dtype_name}"
    try:
        result = plan(layout, profile, compute_budget(profile, layout))
    except PlanError as exc:
        plans.append(f"| {name} | {tier} | {dtype_name} | does not fit: {exc} | | | | | | |")
        entry["plans"][key] = {"error": str(exc)}
        return
    plans.append(f"| {name} | {tier} | {dtype_name} | {result.backend} | {gib(result.resident_bytes):.2f} | "
                         f"{gib(result.streamed_bytes):.2f} | {gib(result.cpu_bytes):.2f} | "
                         f"{gib(result.peak_vram_bytes):.2f} | {result.extra_latency_s * 1e3:.0f} / "
                 f"{result.extra_latency_per_token_s * 1e3:.1f} | {summarise(result)} |")
    entry["plans"][key] = result.to_dict()


def _print(sizes, plans, data, out: Path) -> None:
    print("| model | component | kind | params | GiB (bf16) |\n|---|---|---|---|---|")
    print("\n".join(sizes))
    print()
    print("| model | tier | dtype | backend | resident GiB | streamed GiB | on CPU GiB | peak VRAM GiB | "
          "+ms per request / per frame | placement |\n|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(plans))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
