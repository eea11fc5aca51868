"""`edge-runtime doctor`: hardware, the chosen profile and why, installed backends, what to fix."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

GIB = 1024 ** 3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("doctor", help="check hardware, profile and installed backends",
                              description="Probe the machine, show which profile would be used and why, "
                                          "and list installed backends with pip commands for missing ones.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--bandwidth", action="store_true",
                   help="also measure host<->GPU, offload-disk and memory-copy bandwidth (a few seconds) "
                        "and save it for `edge-runtime plan`'s cost model")
    p.add_argument("--bandwidth-mib", type=int, default=256, metavar="MIB",
                   help="transfer size for --bandwidth (default 256)")
    p.set_defaults(handler=run)
    return p


def collect(profile: Optional[str] = None, overrides: Sequence[str] = (),
            env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Everything doctor reports, JSON-serialisable. Raises ProfileError for a bad profile."""
    from edge_runtime import __version__
    from edge_runtime.policy import hardware
    from edge_runtime.policy import packages
    from edge_runtime.policy.dtypes import choose_dtype
    from edge_runtime.policy.profiles import choose_profile, load_profile

    hw = hardware.probe()
    choice = choose_profile(profile, env, hw)
    prof = load_profile(choice.spec, overrides, env)
    if prof.offload.offload_dir:  # measure free space where this profile would spill
        hw.disk_path, hw.disk_free_bytes = hardware.disk_free(prof.offload.offload_dir)
    gpu = hw.gpu
    dtype = choose_dtype(prof.precision.dtype, "cuda" if gpu else "cpu",
                         gpu.compute_capability if gpu else None, hw.cpu.bf16_native)
    pkgs = packages.report()
    warnings = [w for w in (choice.warning,) if w] + hw.notes
    if dtype.fell_back:
        warnings.append(dtype.reason)
    return {
        "edge_runtime": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hw.to_dict(),
        "profile": {"name": prof.name, "source": prof.source, "chosen_by": choice.chosen_by,
                    "explanation": choice.explanation, "overrides": list(overrides), "values": prof.to_dict()},
        "dtype": {"requested": prof.precision.dtype, "resolved": dtype.dtype, "reason": dtype.reason},
        "packages": pkgs,
        "espeak_library": packages.espeak_library(),
        "missing": sorted({p["install"] for p in pkgs if p["install"]}),
        "warnings": warnings,
    }


def _gib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _print(r: dict[str, Any]) -> None:
    hw, prof, dt = r["hardware"], r["profile"], r["dtype"]
    print(f"edge-runtime {r['edge_runtime']} (Python {r['python']}, {r['platform']})\n\nHardware")
    for g in hw["gpus"]:
        cc = ".".join(map(str, g["compute_capability"] or ())) or "?"
        print(f"  GPU {g['index']:<6} {g['name']}, {_gib(g['total_bytes'])} total, {_gib(g['free_bytes'])} free, "
              f"compute {cc}, bf16 {'yes' if g['bf16_supported'] else 'no'}")
    if not hw["gpus"]:
        print(f"  GPU        none usable (torch {hw['torch_version']}, CUDA build: {hw['torch_cuda'] or 'none'})")
    if hw["driver_version"]:
        print(f"  driver     {hw['driver_version']}")
    c = hw["cpu"]
    print(f"  CPU        {c['model']} ({c['arch']}), {c['physical_cores']} physical / {c['logical_cores']} logical "
          f"cores, {c['usable_cores']} usable; {' '.join(c['isa']) or 'no ISA hints'}")
    print(f"  RAM        {_gib(hw['ram_total_bytes'])} total, {_gib(hw['ram_available_bytes'])} available")
    print(f"  disk       {_gib(hw['disk_free_bytes'])} free at {hw['disk_path']}")
    v = prof["values"]
    print(f"\nProfile      {prof['name']}  (chosen by {prof['chosen_by']}: {prof['explanation']})")
    print(f"  source     {prof['source']}" + (f"  with --set {' '.join(prof['overrides'])}" if prof["overrides"] else ""))
    print(f"  dtype      {dt['resolved']} ({dt['reason']})")
    print(f"  offload    backend {v['offload']['backend']}, target {v['offload']['target']}; "
          f"cleanup {v['cleanup']['policy']}; voice cache {v['voice_cache']['max_entries']} entries / "
          f"{v['voice_cache']['max_mib']:g} MiB; max_batch {v['batching']['max_batch']}")
    print("\nPackages")
    for p in r["packages"]:
        if not p["applies"]:
            continue
        fix = f"  -> {p['install']}" if p["install"] else ""
        print(f"  {'ok' if p['installed'] else '--'}  {p['name']:<19} {p['version'] or 'missing':<12} "
              f"{p['group']:<9} {p['purpose']}{fix}")
    print(f"  espeak-ng library: {r['espeak_library'] or 'not found (pip install espeakng-loader)'}")
    if r["missing"]:
        print("\nTo install what is missing:\n  " + "\n  ".join(r["missing"]))
    if r["warnings"]:
        print("\nWarnings\n  " + "\n  ".join(r["warnings"]))


def measure_bandwidth(offload_dir: Optional[str], size_mib: int = 256) -> dict[str, Any]:
    """Measure (edge_runtime.policy.bandwidth), save to the cache dir; the result plus ``saved_to``."""
    from edge_runtime import paths
    from edge_runtime.policy import bandwidth
    from edge_runtime.errors import InvalidInputError

    if size_mib < 1:
        raise InvalidInputError(f"--bandwidth-mib must be at least 1, not {size_mib}")
    result = bandwidth.measure(size_mib * bandwidth.MIB, disk_dir=paths.offload_dir(offload_dir))
    try:
        saved: Optional[str] = str(bandwidth.save(result))
    except OSError as exc:  # an unwritable cache dir loses the file, not the figures
        saved = None
        result.notes.append(f"not saved: {exc}")
    return {**result.to_dict(), "saved_to": saved}


def _print_bandwidth(b: dict[str, Any]) -> None:
    from edge_runtime.policy.bandwidth import Bandwidth

    rows = Bandwidth.from_dict(b).rows()
    print(f"\nBandwidth    {b['size_bytes'] // 2 ** 20} MiB transfers, median of {b['repeats']}; "
          f"device {b['device']}")
    for path, rate in rows:
        print(f"  {path:<24} {rate}")
    dropped = {True: "yes", False: "no", None: "unknown"}[b["disk_cache_dropped"]]
    print(f"  disk tested at {b['disk_path'] or '-'}; page cache dropped: {dropped}")
    for note in b["notes"]:
        print(f"  note: {note}")
    print(f"  saved to {b['saved_to']} (edge-runtime plan uses it)" if b["saved_to"] else "  not saved")


def run(args: argparse.Namespace) -> int:
    report = collect(args.profile, args.set)
    if getattr(args, "bandwidth", False):
        offload_dir = report["profile"]["values"]["offload"].get("offload_dir")
        report["bandwidth"] = measure_bandwidth(offload_dir, args.bandwidth_mib)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print(report)
        if "bandwidth" in report:
            _print_bandwidth(report["bandwidth"])
    return 0
