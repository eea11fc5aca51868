"""`edge-runtime soak`: N requests per memory configuration; table (Markdown, CSV) and plot."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from edge_runtime.serving.soak import CONFIGS

    p = subparsers.add_parser(
        "soak", help="measure memory and latency over many requests, technique by technique",
        description="Runs N consecutive requests (each with a new voice prompt) for each configuration: "
                    "baseline (autograd, fp32, no cleanup, unbounded voice cache, batch 1), each memory "
                    "technique alone, and all together. Writes soak.md, soak.csv, soak.json and soak.png.")
    p.add_argument("-n", "--requests", type=int, default=20, help="requests per configuration (default 20)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to run (default: all)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the batching configurations (default 4)")
    p.add_argument("--warmup", type=int, default=20, help="requests before the RSS drift is measured (default 20)")
    p.add_argument("--model", help="model to soak (default: the embedded voice)")
    p.add_argument("--max-rss-gib", type=float, help="stop a configuration whose process RSS passes this "
                                                     "(default: half the RAM)")
    p.add_argument("-o", "--out", type=Path, default=Path("out/soak"), help="output folder (default out/soak)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from edge_runtime.errors import InvalidInputError
    from edge_runtime.serving.soak import run_config_isolated
    from edge_runtime.serving.soak_report import summary_markdown, write_report

    if args.requests < 1 or args.batch < 1:
        raise InvalidInputError("--requests and --batch must be at least 1")
    results = []
    for config in args.configs:
        cap = int(args.max_rss_gib * 2**30) if args.max_rss_gib else None
        results.append(run_config_isolated(config, args.requests, model=args.model, profile=args.profile,
                                           overrides=tuple(args.set or ()), batch=args.batch, rss_cap=cap))
    meta = {"requests": args.requests, "batch": args.batch, "warmup": args.warmup,
            "model": args.model or "default", "profile": args.profile or "auto"}
    paths = write_report(results, args.out, args.warmup, meta)
    print(summary_markdown(results, args.warmup))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
