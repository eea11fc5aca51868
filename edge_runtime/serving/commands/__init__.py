"""One module per `edge-runtime` subcommand; each exposes `add_parser(subparsers)`.

`add_parser` creates its parser, calls `set_defaults(handler=run)` and returns the parser;
`run(args) -> int` does the work. Register the module name in `cli.COMMANDS`. Every subcommand
gets --profile/--set from the CLI (merged into `args.profile` / `args.set` before `run`).
"""

from __future__ import annotations

import argparse


def add_profile_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """--profile and --set. Below the top level they use other dests, merged by cli.main."""
    prefix = "" if top_level else "sub_"
    parser.add_argument("--profile", dest=f"{prefix}profile", metavar="NAME|PATH",
                        help="profile name (cpu, 6gb, 8gb, 12gb, 24gb) or YAML path; "
                             "default: $EDGE_RUNTIME_PROFILE, else chosen from the hardware")
    parser.add_argument("--set", dest=f"{prefix}set", action="append", metavar="KEY.PATH=VALUE",
                        help="override one profile value, e.g. --set cleanup.policy=every_n (repeatable)")
