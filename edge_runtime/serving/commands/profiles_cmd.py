"""`edge-runtime profiles list|show`: the shipped profiles, and one profile's resolved values."""

from __future__ import annotations

import argparse
import json

import yaml

from edge_runtime.serving.commands import add_profile_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profiles", help="list profiles or show one's resolved values",
                              description="Profiles are YAML files: one per VRAM tier in profiles/, or your own "
                                          "(`extends: 8gb` plus the keys you change).")
    sub = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the shipped profiles")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=run_list)
    show = sub.add_parser("show", help="one profile with extends and --set applied",
                          description="Print a profile's resolved values (default: the one that would be chosen).")
    show.add_argument("name", nargs="?", metavar="NAME|PATH", help="profile name or YAML path")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_profile_options(show)
    show.set_defaults(handler=run_show)
    return p


def run_list(args: argparse.Namespace) -> int:
    from edge_runtime.policy.profiles import list_profiles, load_profile

    profiles = [load_profile(name, env={}) for name in list_profiles()]
    if args.json:
        print(json.dumps([{"name": p.name, "description": p.description, "vram_gib": p.memory.vram_gib,
                           "source": p.source} for p in profiles], indent=2))
        return 0
    print(f"{'name':6} {'VRAM':>6}  {'dtype':5}  {'offload':10}  description")
    for p in profiles:
        vram = f"{p.memory.vram_gib:g}G" if p.memory.vram_gib else "-"
        print(f"{p.name:6} {vram:>6}  {p.precision.dtype:5}  {p.offload.backend:10}  {p.description}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from edge_runtime.policy.profiles import load_profile

    profile = load_profile(args.name or args.profile, args.set)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    values = profile.to_dict()
    source = values.pop("source")
    extra = f" with --set {' '.join(args.set)}" if args.set else ""
    print(f"# {profile.name}: {source}{extra}")
    print(yaml.safe_dump(values, sort_keys=False, default_flow_style=False).rstrip())
    return 0
