"""`edge-runtime plan`: where each component of a model would live under a profile, and what it costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="show the placement plan of a model under a profile",
        description="Sizes the model's components in the profile's dtype, budgets the tier's VRAM and "
                    "places every block: resident on the GPU, streamed from CPU/disk/NVMe, or computed on "
                    "the CPU; prints bytes, predicted peak VRAM and predicted extra latency.")
    p.add_argument("--model", help="model (default: the embedded voice): piper:NAME, a .onnx voice, a "
                                    "transformers model folder or hub id (sized on the meta device from its config)")
    p.add_argument("--allow-download", action="store_true",
                   help="let a hub id missing from the local cache fetch its config files (kilobytes, "
                        "never weights)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--export", choices=["accelerate", "deepspeed"],
                   help="print (or write with -o) an accelerate device map or a DeepSpeed ZeRO-3 config")
    p.add_argument("-o", "--output", type=Path, help="file for --export")
    p.set_defaults(handler=run)
    return p


def build_plan(model: str | None, profile, cost_model=None, allow_download: bool = False):
    """(Plan, model id, dtype reason, cost model: rates and a note saying where they came from).
    Only config files are read (plan before download); the cost model uses the saved
    `doctor --bandwidth` measurement where there is one."""
    from edge_runtime.runtime.loader import resolve

    resolution = resolve(model, profile=profile, allow_download=allow_download, weights=False,
                         cost_model=cost_model, for_tier=True)
    cost_model = resolution.cost_model
    cost = {"h2d_bytes_per_s": cost_model.h2d_bytes_per_s, "disk_bytes_per_s": cost_model.disk_bytes_per_s,
            "note": resolution.cost_note}
    return resolution.plan, resolution.source.model_id, resolution.dtype_note, cost


def run(args: argparse.Namespace) -> int:
    from edge_runtime.policy.profiles import load_profile

    profile = load_profile(args.profile, tuple(args.set or ()))
    result, model_id, why, cost = build_plan(args.model, profile, allow_download=args.allow_download)
    if args.export:
        exported = (result.to_accelerate_device_map() if args.export == "accelerate"
                    else result.to_deepspeed_config())
        text = json.dumps(exported, indent=2)
        if args.output:
            args.output.write_text(text + "\n")
            print(f"wrote {args.output}")
        else:
            print(text)
        return 0
    if args.json:
        print(json.dumps({"model": model_id, "profile": profile.name, "dtype": why, "cost_model": cost,
                          **result.to_dict()}, indent=2))
        return 0
    print(f"model {model_id} under profile {profile.name}; dtype {why}")
    print(result.table())
    print(cost["note"])
    return 0
