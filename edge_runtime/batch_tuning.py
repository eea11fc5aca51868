"""`max_batch: auto`: measure requests/s per batch size with the loaded model on this hardware, and
pick the size that pays for itself.

Batching is not free: on 2 CPU cores the embedded voice served 3.85 req/s one at a time and 2.35 at
batch 8 (one request already keeps every core busy; padding adds work), while a GPU or an
autoregressive model gains from it. So the choice is measured, never assumed.
"""

from __future__ import annotations

import time
from typing import Any

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, then rests by the river bank."
BATCH_SIZES = (1, 2, 4, 8, 16)  # tried in this order until throughput falls
# A run this long is measured once: its timer noise is small next to it, and repeating it would
# double the start-up of a slow (autoregressive) model: 5-20 s per batch for a tiny random Dia on one
# CPU core (greedy, 707 decoder steps), whose whole curve took 104 s with every size measured twice.
LONG_RUN_S = 2.0


def measure_batch_curve(runtime: Any, sizes: tuple[int, ...] = BATCH_SIZES, repeats: int = 2,
                        text: str = CALIBRATION_TEXT) -> dict[int, float]:
    """Requests/s per batch size with the loaded model on this hardware (best of `repeats`, or of
    one run when it takes LONG_RUN_S or more). Stops at the first size that does not beat the best
    so far, which keeps start-up short. The scheduler refines the choice online while serving."""
    runtime.synthesize(text)  # warm-up: first-call costs are not a property of any batch size
    curve: dict[int, float] = {}
    for size in sizes:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            if size == 1:
                runtime.synthesize(text)
            else:
                runtime.synthesize_batch([text] * size, max_batch=size)
            times.append(time.perf_counter() - start)
            if times[-1] >= LONG_RUN_S:
                break
        best = max(curve.values(), default=0.0)
        curve[size] = size / max(min(times), 1e-9)
        if curve[size] < 1.02 * best:  # no real gain from doubling: larger batches only pad more
            break
    return curve


def choose_batch_size(curve: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest size within `tolerance` of the best throughput: a bigger batch makes each of
    its requests wait for the longest one, so it must pay for itself."""
    best = max(curve.values())
    return min(size for size, rps in curve.items() if rps >= best * (1 - tolerance))
