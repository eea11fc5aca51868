"""`edge-runtime` entry point: global options, the subcommand registry, exit codes.

To add a subcommand, write edge_runtime/commands/NAME.py (see commands/__init__.py) and add
NAME to COMMANDS. Exit codes: 0 ok, 2 usage or configuration error (message, no traceback),
130 interrupted. torch is never imported here: subcommands import what they need when they run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from edge_runtime import __version__
from edge_runtime.serving.commands import add_profile_options
from edge_runtime.errors import EdgeRuntimeError

# Modules under edge_runtime/commands, in --help order.
COMMANDS = ["say", "serve", "voices", "plan", "soak", "doctor", "profiles_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Run text-to-speech models on small GPUs and CPUs with VRAM-tier profiles.",
        epilog="Profile choice: --profile > $EDGE_RUNTIME_PROFILE > tier chosen from the hardware. "
               "Run `edge-runtime doctor` to see what was chosen and why.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    add_profile_options(parser, top_level=True)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.commands.{name}")
        add_profile_options(module.add_parser(subparsers))
    return parser


def _merge_profile_options(args: argparse.Namespace) -> None:
    """`--profile`/`--set` may come before or after the subcommand; after wins / both apply."""
    args.profile = getattr(args, "sub_profile", None) or args.profile
    args.set = [*(args.set or ()), *(getattr(args, "sub_set", None) or ())]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    _merge_profile_options(args)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
