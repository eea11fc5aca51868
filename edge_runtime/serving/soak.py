"""The soak experiment: N consecutive requests per configuration, memory and latency per request.

Configurations switch the engine's memory techniques on one at a time over a baseline that has
none of them (autograd on, fp32, no cleanup, unbounded voice cache, one request at a time), then
all together. Every request brings a voice prompt the cache has not seen, as a service with many
users' voices would, so an unbounded cache shows its growth.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

SENTENCES = [
    "The morning train was late again, so everyone waited on the cold platform.",
    "She opened the letter slowly and read it twice before she said a word.",
    "Small machines can speak clearly when the software respects their limits.",
    "A gentle rain fell over the valley while the farmers brought in the hay.",
    "Please remember to save your work before the battery runs out.",
    "The museum opens at nine and closes early on public holidays.",
]

CONFIGS = {
    # name: (inference mode + profile precision, cleanup, bounded cache, batching)
    "baseline": (False, False, False, False),
    "inference": (True, False, False, False),
    "cleanup": (False, True, False, False),
    "bounded_cache": (False, False, True, False),
    "batching": (False, False, False, True),
    "all": (True, True, True, True),
}


@dataclass
class RequestSample:
    config: str
    index: int
    latency_s: float
    audio_s: float
    rss_mib: float
    cuda_allocated_mib: float | None
    cuda_reserved_mib: float | None
    cuda_peak_mib: float | None
    cache_entries: int
    cache_mib: float
    batch_size: int


@dataclass
class SoakResult:
    config: str
    settings: dict
    samples: list[RequestSample] = field(default_factory=list)
    stopped: str | None = None  # why the configuration ended early (memory cap), if it did

    def summary(self, warmup: int) -> dict:
        lat = np.array([s.latency_s for s in self.samples]) * 1000
        rss = np.array([s.rss_mib for s in self.samples])
        after = rss[min(warmup, len(rss) - 1):]
        drift = (after[-1] - after[0]) / after[0] * 100 if len(after) else 0.0
        return {"config": self.config, "requests": len(self.samples), "stopped": self.stopped,
                "first_ms": float(lat[0]), "median_ms": float(np.median(lat)),
                "p95_ms": float(np.percentile(lat, 95)), "last20_median_ms": float(np.median(lat[-20:])),
                "rss_start_mib": float(after[0]), "rss_end_mib": float(rss[-1]), "rss_max_mib": float(rss.max()),
                "rss_drift_pct": float(drift), "cache_entries": self.samples[-1].cache_entries,
                "cache_mib": self.samples[-1].cache_mib,
                "cuda_peak_mib": max((s.cuda_peak_mib or 0.0) for s in self.samples) or None}


def make_prompts(runtime, count: int) -> list[tuple[np.ndarray, int]]:
    """`count` distinct real-speech prompts: a few synthesised clips, each trimmed by a different
    number of samples (a different content hash, the same voice)."""
    bases = []
    for i, text in enumerate(SENTENCES[:4]):
        audio, rate = runtime.synthesize(text, seed=100 + i)
        bases.append(audio)
    return [(bases[i % len(bases)][(i // len(bases)) * 7:], rate) for i in range(count)]


def build_runtime(config: str, model: str | None, profile: str | None, overrides: tuple[str, ...],
                  batch: int):
    """A Runtime with only `config`'s techniques switched on."""
    from edge_runtime.runtime.loader import load

    precision, cleanup, bounded, batching = CONFIGS[config]
    extra = []
    if not precision:
        extra.append("precision.dtype=fp32")
    if not cleanup:
        extra.append("cleanup.policy=off")
    if not bounded:
        extra += ["voice_cache.max_entries=1000000", "voice_cache.max_mib=1000000"]
    runtime = load(model, profile=profile, overrides=(*overrides, *extra))
    runtime.inference_mode = precision
    if not precision:
        for module in runtime.model.components().values():
            for param in module.parameters():
                param.requires_grad_(True)
    return runtime, (batch if batching else 1)


def default_rss_cap() -> int:
    """Half the machine's RAM: a leaking configuration stops there instead of meeting the OOM killer."""
    import psutil

    return psutil.virtual_memory().total // 2


def run_config(config: str, requests: int, *, model: str | None = None, profile: str | None = None,
               overrides: tuple[str, ...] = (), batch: int = 4, rss_cap: int | None = None,
               progress: Callable[[str], None] = lambda line: None) -> SoakResult:
    runtime, batch_size = build_runtime(config, model, profile, overrides, batch)
    prompts = make_prompts(runtime, requests)
    result = SoakResult(config, {"inference_mode": runtime.inference_mode, "dtype": runtime.dtype.dtype,
                                 "cleanup": runtime.governor.policy, "batch": batch_size,
                                 "cache_max_entries": runtime.voice_cache.max_entries,
                                 "device": runtime.device})
    try:
        index = 0
        cap = rss_cap or default_rss_cap()
        while index < requests:
            rss = runtime.governor.snapshot().rss_bytes
            if rss > cap:
                result.stopped = (f"stopped after {index} requests: RSS {rss / 2**30:.1f} GiB passed the "
                                  f"soak's cap of {cap / 2**30:.1f} GiB")
                progress(f"{config}: {result.stopped}")
                break
            group = range(index, min(requests, index + batch_size))
            texts = [SENTENCES[i % len(SENTENCES)] for i in group]
            start = time.perf_counter()
            voice = None
            for i in group:  # each request's own prompt: prepared (or found) in the cache
                _, voice, _ = runtime.prepare_voice(*prompts[i])
            if batch_size > 1:
                outputs = runtime.synthesize_batch(texts, voice=voice, max_batch=batch_size)
            else:
                outputs = [runtime.synthesize(texts[0], voice=voice)]
            elapsed = time.perf_counter() - start
            snap = runtime.governor.snapshot()
            stats = runtime.voice_cache.stats()
            for i, (audio, rate) in zip(group, outputs):
                result.samples.append(RequestSample(
                    config, i, elapsed / len(group), len(audio) / rate, snap.rss_bytes / 2**20,
                    _mib(snap.cuda_allocated), _mib(snap.cuda_reserved), _mib(snap.cuda_peak),
                    stats["entries"], stats["bytes"] / 2**20, len(group)))
            del outputs, voice
            index += len(group)
            if index % 50 == 0 or index == requests:
                progress(f"{config}: {index}/{requests}")
    finally:
        runtime.close()
        del runtime
        gc.collect()
    return result


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def as_rows(results: list[SoakResult]) -> list[dict]:
    return [asdict(s) for r in results for s in r.samples]


def run_config_isolated(config: str, requests: int, **kwargs) -> SoakResult:
    """`run_config` in a fresh process, so one configuration's heap never colours the next one's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    kwargs.pop("progress", None)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_config, config, requests, progress=_print_progress, **kwargs).result()


def _print_progress(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)
