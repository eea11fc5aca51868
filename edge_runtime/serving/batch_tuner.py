"""`max_batch: auto`: measure requests/s per batch size with the loaded model on this hardware, and
pick the size that pays for itself.

Batching is not free: on 2 CPU cores the embedded voice served 3.85 req/s one at a time and 2.35 at
batch 8 (one request already keeps every core busy; padding adds work), while a GPU or an
autoregressive model gains from it. So the choice is measured, never assumed.

The measurement holds the server's start-up, so it is bounded in time (`STARTUP_BUDGET_S`): a model
whose calibration sentence is slow (an autoregressive model on a CPU: a 1.6B Dia needs minutes per
batch there) is measured on a short sentence instead (the gain from batching is a property of
the model and the hardware, not of the text), and sizes not reached within the budget are left to
the scheduler's online refinement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, then rests by the river bank."
SHORT_CALIBRATION_TEXT = "Hello there, how are you?"
BATCH_SIZES = (1, 2, 4, 8, 16)  # tried in this order until throughput falls
# A run this long is measured once: its timer noise is small next to it, and repeating it would
# double the start-up of a slow (autoregressive) model.
LONG_RUN_S = 2.0
STARTUP_BUDGET_S = 60.0  # how long start-up may spend measuring the curve


def measure_batch_curve(runtime: Any, sizes: tuple[int, ...] = BATCH_SIZES, repeats: int = 2,
                        text: str = CALIBRATION_TEXT, budget_s: float = STARTUP_BUDGET_S) -> dict[int, float]:
    """Requests/s per batch size with the loaded model on this hardware, in requests of the
    calibration text's length (best of `repeats`, or of one run when it takes LONG_RUN_S or more).

    Stops at the first size that does not beat the best so far, which keeps start-up short, and
    once `budget_s` has passed. When one request of `text` times the sum of the sizes (the whole
    curve with no gain at all) would not fit the budget, measures on a short text instead. The
    scheduler refines the choice online while serving."""
    started = time.perf_counter()
    runtime.synthesize(SHORT_CALIBRATION_TEXT)  # warm-up: first-call costs are not a property of any batch size
    single = _timed(runtime, text, 1)
    if single * sum(sizes) > budget_s and len(SHORT_CALIBRATION_TEXT) < len(text):
        log.info("batching: one calibration request takes %.1f s; measuring on a short text to keep start-up "
                 "within %.0f s", single, budget_s)
        text = SHORT_CALIBRATION_TEXT
        single = _timed(runtime, text, 1)
    scale = len(text) / len(CALIBRATION_TEXT)  # -> requests of the calibration text's length
    curve: dict[int, float] = {}
    for size in sizes:
        if curve and time.perf_counter() - started > budget_s:
            log.info("batching: start-up budget of %.0f s spent before batch %d; larger sizes are left to "
                     "the online refinement", budget_s, size)
            break
        times = [single] if size == 1 else []
        while len(times) < repeats and not (times and times[-1] >= LONG_RUN_S):
            times.append(_timed(runtime, text, size))
        best = max(curve.values(), default=0.0)
        curve[size] = scale * size / max(min(times), 1e-9)
        if curve[size] < 1.02 * best:  # no real gain from doubling: larger batches only pad more
            break
    return curve


def _timed(runtime: Any, text: str, size: int) -> float:
    start = time.perf_counter()
    if size == 1:
        runtime.synthesize(text)
    else:
        runtime.synthesize_batch([text] * size, max_batch=size)
    return time.perf_counter() - start


def choose_batch_size(curve: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest size within `tolerance` of the best throughput: a bigger batch makes each of
    its requests wait for the longest one, so it must pay for itself."""
    best = max(curve.values())
    return min(size for size, rps in curve.items() if rps >= best * (1 - tolerance))
