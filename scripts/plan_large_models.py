"""Plans of the models that do not fit a consumer card, at their published sizes, under every GPU tier.

    python scripts/plan_large_models.py [--out bench_results/plan_large_models.json]

Writes config-only folders (no weights) of Higgs Audio V2 (scripts/higgs_configs.py) and
VibeVoice-1.5B / VibeVoice-Large (scripts/vibevoice_configs.py), plans each one exactly as
`edge-runtime plan --model FOLDER --profile TIER` does, and prints one row per model and tier: whether
every per-frame block is on the GPU, what was quantized, predicted peak VRAM, what streams, and the
predicted extra latency per frame and per request. Nothing is downloaded; no tensor is allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

TIERS = ("6gb", "8gb", "12gb", "24gb")
GIB = 1024**3


def write_folders(root: Path) -> dict[str, Path]:
    import higgs_configs
    import vibevoice_configs

    folders = {"higgs-audio-v2-3b": higgs_configs.write(root / "higgs-audio-v2-3b")}
    folders.update(vibevoice_configs.write_all(root))
    return folders


def plan_row(name: str, folder: Path, tier: str) -> dict:
    from edge_runtime.policy.planner import PlanError
    from edge_runtime.policy.profiles import load_profile
    from edge_runtime.serving.commands.plan import build_plan

    profile = load_profile(tier)
    try:
        result, _, dtype, _ = build_plan(str(folder), profile)
    except PlanError as exc:
        return {"model": name, "tier": tier, "error": str(exc)}
    quantized = result.quantized_blocks()
    counts = {p: sum(1 for v in quantized.values() if v == p) for p in ("int8", "int4")}
    prefill = [b for b in result.blocks if b.component and not b.autoregressive]
    return {
        "model": name, "tier": tier, "dtype": result.dtype, "fits": bool(result.fits),
        "int8_blocks": counts["int8"], "int4_blocks": counts["int4"],
        "predicted_error": max((b.predicted_error for b in result.blocks), default=0.0),
        "total_gib": sum(b.bytes for b in result.blocks) / GIB,
        "peak_vram_gib": result.peak_vram_bytes / GIB, "usable_gib": result.budget.usable_bytes / GIB,
        "resident_gib": result.resident_bytes / GIB, "streamed_gib": result.streamed_bytes / GIB,
        "cpu_gib": result.cpu_bytes / GIB,
        "off_gpu_once_gib": sum(b.bytes for b in prefill if b.placement != "gpu") / GIB,
        "extra_ms_per_frame": 1e3 * result.extra_latency_per_token_s,
        "extra_ms_per_request": 1e3 * result.extra_latency_s,
        "backend": result.backend, "notes": list(result.notes),
    }


def table(rows: list[dict]) -> str:
    head = (f"{'model':<20} {'tier':<5} {'fits':<4} {'LM precision':<16} {'peak GiB':>8} {'of':>5} "
            f"{'streamed':>8} {'on CPU':>7} {'+ms/frame':>9} {'+ms/req':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<20} {r['tier']:<5} no   {r['error'][:90]}")
            continue
        parts = [f"{r[p + '_blocks']} {p}" for p in ("int8", "int4") if r[p + "_blocks"]]
        precision = ", ".join(parts) if parts else r["dtype"]
        lines.append(f"{r['model']:<20} {r['tier']:<5} {'yes' if r['fits'] else 'no':<4} {precision:<16} "
                     f"{r['peak_vram_gib']:8.2f} {r['usable_gib']:5.1f} {r['streamed_gib']:8.2f} "
                     f"{r['cpu_gib']:7.2f} {r['extra_ms_per_frame']:9.2f} {r['extra_ms_per_request']:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "plan_large_models.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(tmp))
        rows = [plan_row(name, folder, tier) for name, folder in folders.items() for tier in TIERS]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
