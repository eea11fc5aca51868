"""`edge-runtime voices`: the voices this machine can use without a download."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("voices", help="list installed voices",
                              description="List embedded voices and Piper voices in the voices folder.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from edge_runtime.models import registry
    from edge_runtime.models.piper.catalog import voices_dir

    voices = registry.installed()
    if args.json:
        print(json.dumps({"voices": voices, "voices_dir": str(voices_dir())}, indent=2))
        return 0
    print(f"{'voice':32} {'source':12} path")
    for v in voices:
        print(f"{v['id']:32} {v['source']:12} {v['path']}")
    print(f"\nextra voices are read from {voices_dir()} (NAME.onnx + NAME.onnx.json)")
    return 0
