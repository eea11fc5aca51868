#!/usr/bin/env python
"""Micro-batching through the real server: requests/s and p50/p95 latency at 1, 4, 8 and 16
concurrent clients, with `batching.max_batch: auto` against fixed sizes (1 = off, 2, 4, 8), for the
embedded voice and for an autoregressive transformers model (a tiny random Dia), in one run.

Every (model, setting) is its own `edge-runtime serve` process (profile `cpu`, `runtime.threads=1`,
`--set batching.max_batch=N|auto`, everything else the profile's; fixed sizes with --no-warm-up, as
the bench warms every server itself), started one after another so that auto's start-up
measurement runs on a quiet machine, then all kept up while the rows are measured. Rows are
measured concurrency by concurrency, in short rounds (default 5; noise on a shared VM comes in
bursts, and many short rounds spread each setting over them): each round runs every setting of the
model back to back (the order rotated from round to round). Each run: N asyncio httpx clients
(closed loop: each posts its next request when the previous answer arrived) posting
/v1/audio/speech; the first N answers (one wave, unmeasured) bring the server to its steady state,
then the round's request count is measured: latency = post to last byte of each request posted
after the first wave; requests/s = clients / mean latency (Little's law: each client always has one
request in flight; answers over a wall-clock window would be off by up to a whole batch at either
end, and 16 requests at batch 8 are just two batches; the wall-clock figure is kept in the JSON).
A row's requests/s, p50 and p95 are the medians of its rounds'. Auto is compared with the best
fixed size round by round (the two ran back to back, so the machine's drift cancels), and the
median of those ratios is the row's figure. Responses carry the server's own
X-Queue-Seconds and X-Compute-Seconds, printed per row to show where latency goes.

Noise: on a shared 2-core VM one request's time varies by +-20% from minute to minute (CPU steal);
at 1 client every setting runs the same batches of 1, so the spread of that row is printed as the
noise floor to read the other rows' differences against.

Requests ask for `flac`: whole-audio formats are what the scheduler batches (wav and pcm responses
always stream, and streams run alone, so they would measure batching "off" in every column).

The Dia model is tests/hf_tiny_dia.py's, built into a temporary folder, with greedy decoding in its
generation_config.json: with the published sampling settings a random model draws its EOS at random
steps, so a request's length (and the time of the batch it rides in, the longest row's) would be a
lottery; greedy, each text always makes the same number of frames (up to its step cap, which comes
from its text length), as a real model's speech does. Its texts are short (12-13 characters, ~130
decoder steps, about one second each on one core) to keep the run within minutes.

Prints a markdown table, auto's choice and measured curve per model, the issue's targets (auto >=
0.95 x the best fixed size on every row; for the autoregressive model auto at 8 clients >= 1.5 x
off with p95 <= 2 x the single-request latency, i.e. the p50 at 1 client with batching off), and
writes JSON (default bench_results/batching.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SETTINGS = ("auto", "1", "2", "4", "8")
CONCURRENCY = (1, 4, 8, 16)
# one sentence each, 40-45 characters: within the scheduler's 2x length band of each other
PIPER_TEXTS = ("The quick brown fox jumps over the lazy dog.",
               "A gentle breeze carried the smell of rain.",
               "Please lock the door when you leave today.",
               "Our train leaves at half past nine sharp.")
DIA_TEXTS = ("Hello there.", "Good morning.", "See you soon.", "Thanks a lot.")
SERVE_TIMEOUT_S = 600  # start-up (auto measures its curve first)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class Server:
    """`edge-runtime serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str | None, setting: str, extra_sets: tuple[str, ...] = ()) -> None:
        self.setting = setting
        cmd = [sys.executable, "-m", "edge_runtime", "serve", "--port", "0", "--profile", "cpu",
               "--set", "runtime.threads=1", "--set", f"batching.max_batch={setting}"]
        if setting != "auto":  # auto's start-up measures the curve; the bench warms every server itself
            cmd.append("--no-warm-up")
        for item in extra_sets:
            cmd += ["--set", item]
        if model:
            cmd += ["--model", model]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.lines: list[str] = []
        self.url = ""
        self.ready = threading.Event()
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(SERVE_TIMEOUT_S) or not self.url:
            self.stop()
            raise RuntimeError(f"server ({setting}) did not start:\n" + "\n".join(self.lines[-20:]))
        self.startup_s = time.perf_counter() - started

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self.lines.append(line)
            match = re.search(r"serving on (http://\S+?) ", line)
            if match:
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()  # exited

    @property
    def batching_line(self) -> str:
        return next((line for line in self.lines if line.startswith("batching:")), "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_metrics(url: str) -> dict:
    """max_batch and the measured curve from /metrics (what a scraper sees)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    curve, max_batch = {}, None
    for line in text.splitlines():
        if line.startswith("edge_runtime_max_batch "):
            max_batch = int(float(line.split()[-1]))
        match = re.match(r'edge_runtime_batch_throughput_requests_per_second\{batch_size="(\d+)"\} (\S+)', line)
        if match:
            curve[int(match.group(1))] = float(match.group(2))
    return {"max_batch": max_batch, "curve": dict(sorted(curve.items()))}


async def drive(url: str, texts: tuple[str, ...], concurrency: int, requests: int, warm: int = 0) -> dict:
    """`concurrency` closed-loop clients: `warm` answers unmeasured, then `requests` measured."""
    import httpx

    issued = 0
    completed = 0
    measure_from = None  # when the warm-th answer arrived
    latencies: list[float] = []
    batch_sizes: list[int] = []
    queued: list[float] = []  # server-side: waiting for the worker (X-Queue-Seconds)
    computed: list[float] = []  # server-side: the batch's forward (X-Compute-Seconds)
    errors: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, completed, measure_from
        while issued < warm + requests:
            index = issued
            issued += 1
            body = {"model": "tts-1", "voice": "alloy", "input": texts[index % len(texts)],
                    "response_format": "flac"}
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/audio/speech", json=body)
            data = response.content
            end = time.perf_counter()
            completed += 1
            if completed == warm:
                measure_from = end
            if response.status_code != 200 or not data:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                continue
            if index >= warm:
                latencies.append(end - start)
                batch_sizes.append(int(response.headers.get("x-batch-size", "1")))
                queued.append(float(response.headers.get("x-queue-seconds", "nan")))
                computed.append(float(response.headers.get("x-compute-seconds", "nan")))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        end = time.perf_counter()
    if not latencies:
        raise RuntimeError(f"no request succeeded: {errors[:3]}")
    wall = end - (measure_from or start)
    # Little's law: every client always has one request in flight (it posts again at once), so
    # requests/s = clients / mean latency. Answers counted over a wall-clock window would be off by
    # up to a batch at either end: 16 requests at batch 8 are only two batches.
    return {"concurrency": concurrency, "errors": errors, "rps": concurrency / statistics.fmean(latencies),
            "rps_wall": (completed - warm) / wall, "latencies": latencies, "batch_sizes": batch_sizes,
            "queued": queued, "computed": computed}


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a setting's rounds at one concurrency: requests/s, p50 and p95 are the medians
    of the rounds' (a round slowed by the machine does not drag them: pooled, one slow round of five
    is 20% of the requests and sets the p95 alone; the pooled p95 is kept in the JSON)."""
    pooled = {key: [v for r in rounds for v in r[key]] for key in ("latencies", "batch_sizes", "queued", "computed")}
    errors = [e for r in rounds for e in r["errors"]]
    return {"concurrency": rounds[0]["concurrency"], "requests": len(pooled["latencies"]), "errors": len(errors),
            "error_samples": errors[:3], "rounds_rps": [r["rps"] for r in rounds],
            "rounds_rps_wall": [r["rps_wall"] for r in rounds], "rps": statistics.median(r["rps"] for r in rounds),
            "latencies_s": [round(v, 4) for v in pooled["latencies"]], "batch_sizes": pooled["batch_sizes"],
            "p50_s": statistics.median(percentile(r["latencies"], 0.5) for r in rounds),
            "p95_s": statistics.median(percentile(r["latencies"], 0.95) for r in rounds),
            "pooled_p95_s": percentile(pooled["latencies"], 0.95),
            "mean_batch": statistics.fmean(pooled["batch_sizes"]), "max_batch_seen": max(pooled["batch_sizes"]),
            "queue_p50_s": percentile(pooled["queued"], 0.5), "compute_p50_s": percentile(pooled["computed"], 0.5)}


def build_dia(folder: Path) -> Path:
    """tests/hf_tiny_dia.py's model, switched to greedy decoding (see the module docstring)."""
    from hf_tiny_dia import build_tiny_dia

    build_tiny_dia(folder)
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["do_sample"] = False
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def bench_model(name: str, model: str | None, texts: tuple[str, ...], settings: tuple[str, ...],
                concurrency: tuple[int, ...], requests_for, rounds: int, extra_sets: tuple[str, ...] = ()) -> dict:
    servers: dict[str, Server] = {}
    rows: list[dict] = []
    try:
        for setting in settings:  # one at a time: auto measures its curve at start-up
            log(f"[{name}] starting server, max_batch={setting} ...")
            server = servers[setting] = Server(model, setting, extra_sets)
            log(f"[{name}]   up in {server.startup_s:.1f} s at {server.url}; {server.batching_line}")
        for server in servers.values():  # first requests pay one-off costs (connections, caches)
            asyncio.run(drive(server.url, texts, 1, 2))
        turn = 0
        for clients in concurrency:
            count = requests_for(clients)
            measured: dict[str, list[dict]] = {setting: [] for setting in settings}
            for round_index in range(rounds):
                order = settings[turn % len(settings):] + settings[:turn % len(settings)]
                turn += 1
                for setting in order:
                    result = asyncio.run(drive(servers[setting].url, texts, clients, count, warm=clients))
                    measured[setting].append(result)
                    log(f"[{name}] round {round_index + 1}/{rounds} max_batch={setting:>4} clients={clients:>2}: "
                        f"{result['rps']:.2f} req/s, p50 {percentile(result['latencies'], 0.5):.2f} s, "
                        f"mean batch {statistics.fmean(result['batch_sizes']):.1f}")
            for setting in settings:
                row = merge_rounds(measured[setting])
                row.update(model=name, setting=setting)
                rows.append(row)
                log(f"[{name}] max_batch={setting:>4} clients={clients:>2}: {row['rps']:.2f} req/s (median of "
                    f"{rounds}), p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, mean batch {row['mean_batch']:.1f}"
                    f" (server: queued p50 {row['queue_p50_s']:.2f} s, compute p50 {row['compute_p50_s']:.2f} s)")
        auto = None
        if "auto" in servers:
            server = servers["auto"]
            metrics = read_metrics(server.url)
            auto = {"startup_line": server.batching_line, "startup_s": server.startup_s,
                    "choice_at_startup": parse_choice(server.batching_line),
                    "max_batch_at_end": metrics["max_batch"], "curve": metrics["curve"]}
        return {"model": name, "model_path": model, "texts": list(texts), "rows": rows, "auto": auto,
                "startup_s": {s: srv.startup_s for s, srv in servers.items()}}
    finally:
        for server in servers.values():
            server.stop()


def parse_choice(line: str) -> int | None:
    match = re.search(r"auto -> (\d+)", line)
    return int(match.group(1)) if match else None


def targets(result: dict, autoregressive: bool) -> dict:
    rows = result["rows"]
    by = {(r["setting"], r["concurrency"]): r for r in rows}
    fixed = sorted({r["setting"] for r in rows if r["setting"] != "auto"}, key=int)
    checks: dict = {"rows": []}
    for clients in sorted({r["concurrency"] for r in rows}):
        if ("auto", clients) not in by:
            continue
        best = max(fixed, key=lambda s: by[(s, clients)]["rps"])
        # paired: auto's round r against the best fixed size's round r, run back to back, so the
        # machine's drift between rounds cancels; the median over rounds
        pairs = zip(by[("auto", clients)]["rounds_rps"], by[(best, clients)]["rounds_rps"])
        ratio = statistics.median(a / b for a, b in pairs)
        checks["rows"].append({"concurrency": clients, "best_fixed": int(best), "ratio": ratio, "ok": ratio >= 0.95})
    checks["auto_vs_best_fixed_ok"] = all(r["ok"] for r in checks["rows"])
    if autoregressive and ("auto", 8) in by and ("1", 8) in by and ("1", 1) in by:
        single = by[("1", 1)]["p50_s"]
        gain = by[("auto", 8)]["rps"] / by[("1", 8)]["rps"]
        p95 = by[("auto", 8)]["p95_s"]
        checks.update(single_request_latency_s=single, gain_at_8=gain, p95_at_8_s=p95,
                      p95_over_single=p95 / single, gain_ok=gain >= 1.5, p95_ok=p95 <= 2 * single)
    return checks


def noise_floor(result: dict) -> float | None:
    """(max - min) / max of requests/s at 1 client, where every setting runs the same batches of 1."""
    rates = [r["rps"] for r in result["rows"] if r["concurrency"] == 1]
    return (max(rates) - min(rates)) / max(rates) if len(rates) > 1 else None


def markdown(results: list[dict]) -> str:
    lines = ["| model | max_batch | clients | requests | req/s | p50 s | p95 s | mean batch | x off |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SETTINGS)}
    for result in results:
        by = {(r["setting"], r["concurrency"]): r for r in result["rows"]}
        for row in sorted(result["rows"], key=lambda r: (r["concurrency"], order.get(r["setting"], 99))):
            off = by.get(("1", row["concurrency"]))
            label = row["setting"] + (" (off)" if row["setting"] == "1" else "")
            lines.append(f"| {result['model']} | {label} | {row['concurrency']} | {row['requests']} | "
                         f"{row['rps']:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['mean_batch']:.1f} | "
                         + (f"{row['rps'] / off['rps']:.2f} |" if off else "- |"))
    return "\n".join(lines)


def report_targets(result: dict) -> list[str]:
    checks = result["targets"]
    noise = result.get("noise_floor")

    def note(row: dict) -> str:
        if row["ok"] or noise is None:
            return ""
        return " (within the noise floor)" if row["ratio"] >= 1 - noise else " (beyond the noise floor)"

    out = [f"{result['model']}: auto >= 0.95 x best fixed on every concurrency: "
           f"{'PASS' if checks['auto_vs_best_fixed_ok'] else 'FAIL'} ("
           + ", ".join(f"{r['concurrency']} clients: {r['ratio']:.2f} x max_batch={r['best_fixed']}{note(r)}"
                       for r in checks["rows"]) + ")"]
    if "gain_at_8" in checks:
        out.append(f"{result['model']}: auto at 8 clients >= 1.5 x off: {'PASS' if checks['gain_ok'] else 'FAIL'} "
                   f"({checks['gain_at_8']:.2f} x); p95 <= 2 x single-request latency: "
                   f"{'PASS' if checks['p95_ok'] else 'FAIL'} (p95 {checks['p95_at_8_s']:.2f} s = "
                   f"{checks['p95_over_single']:.2f} x {checks['single_request_latency_s']:.2f} s)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="piper,dia", help="comma-separated: piper, dia (default both)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="max_batch settings (default auto,1,2,4,8)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="clients per row")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per row, interleaved with the other settings; requests/s is their median (default 5)")
    parser.add_argument("--piper-requests", type=int, default=1,
                        help="requests per round for the embedded voice: max(8, N x clients) (default 1)")
    parser.add_argument("--dia-requests", type=int, default=1,
                        help="requests per round for Dia: max(6, N x clients) (default 1)")
    parser.add_argument("--set", action="append", default=[], dest="extra_sets",
                        help="extra --set KEY=VALUE for every server (e.g. batching.max_wait_ms=20)")
    parser.add_argument("-o", "--output", default=str(ROOT / "bench_results" / "batching.json"))
    args = parser.parse_args()

    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    extra = tuple(args.extra_sets)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_batching_") as tmp:
        for name in models:
            if name == "piper":
                result = bench_model("piper:en_US-joe-medium", None, PIPER_TEXTS, settings, concurrency,
                                     lambda c: max(8, args.piper_requests * c), args.rounds, extra)
                result["targets"] = targets(result, autoregressive=False)
            elif name == "dia":
                folder = build_dia(Path(tmp) / "tiny-dia")
                result = bench_model("dia (tiny, random)", str(folder), DIA_TEXTS, settings, concurrency,
                                     lambda c: max(6, args.dia_requests * c), args.rounds, extra)
                result["targets"] = targets(result, autoregressive=True)
            else:
                parser.error(f"unknown model {name!r}; use piper or dia")
            results.append(result)

    print(markdown(results))
    print()
    for result in results:
        auto = result["auto"]
        if auto:
            curve = ", ".join(f"{size}: {rps:.2f}" for size, rps in auto["curve"].items())
            print(f"{result['model']}: auto chose max_batch {auto['choice_at_startup']} at start-up "
                  f"(measured requests/s by batch size: {curve}; start-up {auto['startup_s']:.0f} s); "
                  f"max_batch at the end of the run: {auto['max_batch_at_end']}")
    print()
    for result in results:
        result["noise_floor"] = noise_floor(result)
        if result["noise_floor"] is not None:
            print(f"{result['model']}: noise floor {100 * result['noise_floor']:.0f}% (spread of requests/s at "
                  "1 client, where every setting runs the same batches of 1)")
        for line in report_targets(result):
            print(line)
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")

    import torch

    payload = {"benchmark": "batching", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_average_at_end": os.getloadavg()},
               "server": {"profile": "cpu", "sets": ["runtime.threads=1", "batching.max_batch=<setting>", *extra],
                          "response_format": "flac"},
               "settings": list(settings), "concurrency": list(concurrency), "rounds": args.rounds, "total_s": total, "results": results}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
