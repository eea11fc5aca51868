#!/usr/bin/env python
"""Offload backends side by side, in one run: resident, accelerate's own hooks, our prefetching
streamer, DeepSpeed ZeRO-3 (cpu; nvme where libaio is present).

Models: a ~400 MB random transformer-shaped stack (TinyStack from tests/offload_models.py, every
block streamed) and the embedded Piper voice (flow and decoder streamed). On a CPU machine the
streamed weights come from disk (the safetensors file) - with the page cache warm, and "cold"
(the file's pages dropped before every request, so each request really reads the disk); on a
CUDA machine from pinned host RAM to the GPU, where the streamer is also checked against the
physical limit max(resident compute, bytes moved / measured host->device bandwidth).

Latency: all backends of one model are loaded in one process and timed interleaved, request by
request (median of --repeats after warm-up), so machine noise hits every row alike. Peak memory:
each backend again in its own process (VmHWM after clear_refs, and CUDA max allocated).
Prints a markdown table and writes JSON (default bench_results/offload.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

STACK = dict(vocab=256, hidden=1024, ffn=4096, layers=12)  # 12 x 32 MiB blocks in fp32
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
        "wick, polished the great lens, and watched the ships pass safely through the channel.")
PIPER_TIER = ("memory.vram_gib=0.25", "memory.reserve_gib=0", "batching.max_batch=1",
              "offload.keep_resident=[]", "precision.dtype=fp32")


def backends_available() -> list[str]:
    names = ["resident", "accelerate", "streamer"]
    try:
        import deepspeed  # noqa: F401

        names.append("deepspeed")
    except ImportError:
        pass
    return names


def nvme_available() -> bool:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:  # noqa: BLE001 - no deepspeed or no libaio: no nvme row
        return False


class Workload:
    """One model loaded by one backend, and one request on it."""

    def __init__(self, model: str, backend: str, device, target: str, store: Path) -> None:
        import torch

        self.model, self.backend, self.device = model, backend, device
        if model == "stack":
            from edge_runtime.runtime.backends import LoadRequest, load_model
            from offload_models import TinyStack, plan_for

            plan = plan_for(STACK, 0.0, target=target)
            self.loaded = load_model(LoadRequest(build=lambda: TinyStack(**STACK), checkpoint=store, plan=plan,
                                                 device=device, dtype=torch.float32,
                                                 offload_dir=store.parent, options={"nvme_path": str(store.parent)}),
                                     backend)
            ids = torch.randint(0, STACK["vocab"], (1, 128), generator=torch.Generator().manual_seed(0))
            self.ids = ids.to(device)
            self.files = [store, *store.parent.glob("*.*.safetensors")]
        else:
            from edge_runtime.models import registry
            from edge_runtime.models.piper.weights_cache import cached_weights
            from edge_runtime.runtime.loader import load

            # the runtime's own loader: the 6gb tier squeezed so the plan offloads, this backend;
            # the resident baseline on the whole tier
            squeeze = ("precision.dtype=fp32",) if backend == "resident" else (*PIPER_TIER, f"offload.backend={backend}")
            where = "cpu" if backend == "deepspeed" and target == "disk" else target  # ZeRO-3 takes cpu|nvme
            self.runtime = load(profile="6gb", overrides=(*squeeze, f"offload.target={where}"))
            self.adapter = self.runtime.model
            handle = self.runtime.placement_handle
            self.loaded = handle.handles.get("") if handle is not None else None  # None: resident, direct
            self.files = [Path(self.loaded.details["store"])] if self.loaded and "store" in self.loaded.details else []
            source = registry.resolve(None)
            self.files.append(cached_weights(source.path, source.files.get("config"))[0])

    def request(self) -> None:
        import torch

        with torch.inference_mode():
            if self.model == "stack":
                self.loaded.model(self.ids)
            else:
                from edge_runtime.models.base import SynthesisSettings

                for _ in self.adapter.synthesize_unit(TEXT, SynthesisSettings(noise_scale=0.0, noise_w=0.0)):
                    pass
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def drop_page_cache(self) -> None:
        for path in self.files:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    @property
    def stats(self):
        return self.loaded.stats if self.loaded is not None else None


def time_interleaved(model: str, names: list[str], device, target: str, store: Path, repeats: int,
                     cold: bool) -> dict:
    loads = {n: Workload(model, n, device, target, store) for n in names}
    times = {n: [] for n in names}
    moved = {}
    for w in loads.values():  # warm-up: kernels, the streamer learns the block order
        w.request()
        w.request()
    for _ in range(repeats):
        for n, w in loads.items():
            if cold:
                w.drop_page_cache()
            if w.stats:
                w.stats.reset()
            start = time.perf_counter()
            w.request()
            times[n].append(time.perf_counter() - start)
            moved[n] = w.stats.bytes_moved if w.stats else 0
    for w in loads.values():
        if w.loaded is not None:
            w.loaded.close()
    return {n: {"latency_s": statistics.median(t), "bytes_moved": moved[n]} for n, t in times.items()}


def peak_child(model: str, backend: str, device: str, target: str, store: str) -> dict:
    """In a fresh process: load, reset the peak, run 3 requests, report peaks."""
    import torch

    from edge_runtime.runtime.memory import peak_rss_bytes

    w = Workload(model, backend, torch.device(device), target, Path(store))
    load_peak = peak_rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        w.request()
    out = {"peak_rss": peak_rss_bytes(), "load_peak_rss": load_peak}
    if device == "cuda":
        out["peak_vram"] = torch.cuda.max_memory_allocated()
    return out


def measure_peaks(model, names, device, target, store) -> dict:
    out = {}
    for n in names:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_offload as b; "
                f"print(json.dumps(b.peak_child({model!r}, {n!r}, {device.type!r}, {target!r}, {str(store)!r})))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
            {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return out


def h2d_bandwidth() -> float | None:
    """Pinned host->device bytes/s, measured now (the physical limit of streamed weights)."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    samples = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        samples.append(src.numel() / (time.perf_counter() - start))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="stack,piper", help="comma list of: stack, piper")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--no-peaks", action="store_true", help="skip the per-backend memory processes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "offload.json")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = "cpu" if device.type == "cuda" else "disk"
    names = backends_available()
    bw = h2d_bandwidth()
    workdir = Path(tempfile.mkdtemp(prefix="bench_offload_"))
    from offload_models import save_random

    store, _ = save_random(workdir / "stack.safetensors", **STACK)
    states = ["warm", "cold"] if device.type == "cpu" else ["pinned"]
    rows = []
    for model in args.models.split(","):
        peaks = {} if args.no_peaks else measure_peaks(model, names, device, target, store)
        for state in states:
            timed = time_interleaved(model, names, device, target, store, args.repeats, state == "cold")
            if "deepspeed" in names and nvme_available() and device.type == "cuda":
                timed.update({"deepspeed-nvme": time_interleaved(model, ["deepspeed"], device, "nvme", store,
                                                                  args.repeats, False)["deepspeed"]})
            base = timed["resident"]["latency_s"]
            acc = timed["accelerate"]["latency_s"]
            for n, r in timed.items():
                row = {"model": model, "weights": state, "backend": n, **r,
                       "vs_resident": r["latency_s"] / base, "vs_accelerate": r["latency_s"] / acc,
                       **peaks.get(n, {})}
                if bw and n == "streamer":
                    bound = max(base, r["bytes_moved"] / bw)
                    row.update(bound_s=bound, vs_bound=r["latency_s"] / bound)
                rows.append(row)

    head = "| model | weights | backend | latency ms | x resident | x accelerate | MiB moved/req | peak RSS MiB |"
    print(f"device {device}, threads {torch.get_num_threads()}, streamed weights from "
          f"{'pinned RAM' if device.type == 'cuda' else 'disk (safetensors, memory-mapped)'}"
          + (f", host->device {bw / 1e9:.1f} GB/s" if bw else ""))
    print(head + (" peak VRAM MiB | x bound |" if bw else ""))
    print("|---" * (head.count("|") - 1 + (2 if bw else 0)) + "|")
    for r in rows:
        line = (f"| {r['model']} | {r['weights']} | {r['backend']} | {r['latency_s'] * 1e3:.1f} | "
                f"{r['vs_resident']:.2f} | {r['vs_accelerate']:.2f} | {r['bytes_moved'] / 2**20:.0f} | "
                f"{r['peak_rss'] / 2**20:.0f} |" if "peak_rss" in r else
                f"| {r['model']} | {r['weights']} | {r['backend']} | {r['latency_s'] * 1e3:.1f} | "
                f"{r['vs_resident']:.2f} | {r['vs_accelerate']:.2f} | {r['bytes_moved'] / 2**20:.0f} | - |")
        if bw:
            line += f" {r.get('peak_vram', 0) / 2**20:.0f} | {r.get('vs_bound', float('nan')):.2f} |"
        print(line)
    streamer_wins = all(r["vs_accelerate"] < 1.0 for r in rows if r["backend"] == "streamer")
    print(f"streamer faster than accelerate's hooks on every row: {'yes' if streamer_wins else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                                    "h2d_bytes_per_s": bw, "nvme": nvme_available(), "rows": rows,
                                    "streamer_faster_than_accelerate": streamer_wins}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
