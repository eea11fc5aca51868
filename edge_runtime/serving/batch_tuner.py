"""The batch-size tuner: the one place that decides how many requests share a forward.

Batching is not free: on 2 CPU cores the embedded voice served 3.85 req/s one at a time and 2.35 at
batch 8 (one request already keeps every core busy; padding adds work), while a GPU or an
autoregressive model gains from it. So for `max_batch: auto` the choice is measured, never assumed:

* At start-up (`calibrate`, on the worker thread) requests/s is measured per batch size with the
  loaded model, and the smallest size within 5% of the best is chosen. The measurement holds the
  server's start-up, so it is bounded in time (`STARTUP_BUDGET_S`): a model whose calibration
  sentence is slow (a 1.6B Dia on a CPU needs minutes per batch) is measured on a short sentence
  (the gain from batching is a property of the model and the hardware, not of the text), and sizes
  not reached within the budget are left to the online refinement.
* While serving (`observe`, fed by the worker with every speech batch's measured time) each batch's
  throughput, in requests of the calibration text's length per second (so batches of other texts
  compare), is folded into a moving average per size (`online_curve`). While batches fill up to the
  current size, every `probe_every`-th runs at a neighbouring size (double or half, alternately; one
  already measured only every 4 x `probe_every`-th). Each such batch is compared with the current
  size's moving average at that moment (a paired comparison: the machine's slow drift cancels), and
  the choice moves once at least `MIN_SAMPLES` ratios put the neighbour ahead by more than
  `MOVE_MARGIN` with two standard errors to spare: one batch's time varies by +-20% on a shared
  2-core VM, and comparing averages taken minutes apart moved on noise.

The plan bound: on a GPU the placement plan says how many requests fit its VRAM budget
(`Plan.max_batch`); auto never chooses, probes or measures a size above it. A fixed `max_batch`
above it is kept (the user asked for it, the bound is an estimate, and the runtime splits a batch
that runs out of memory) but `warning()` says so at start-up.

The clock and the start-up measurement are injectable: tests run on simulated time.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, then rests by the river bank."
SHORT_CALIBRATION_TEXT = "Hello there, how are you?"
BATCH_SIZES = (1, 2, 4, 8, 16)  # tried in this order until throughput falls
# A run this long is measured once: its timer noise is small next to it, and repeating it would
# double the start-up of a slow (autoregressive) model.
LONG_RUN_S = 2.0
STARTUP_BUDGET_S = 60.0  # how long start-up may spend measuring the curve
# online refinement
ONLINE_ALPHA = 0.3  # weight of a new sample in a batch size's moving average
PROBE_EVERY = 8  # while batches fill up, one in this many tries a neighbouring size (x4 once known)
MIN_SAMPLES = 4  # compared batches a neighbour needs before the choice may move to it
MOVE_MARGIN = 0.03  # ... and how much better than the current size it must be (beyond 2 standard errors)
RATIO_WINDOW = 16  # the most recent comparisons kept per neighbour

Clock = Callable[[], float]  # seconds, monotonic
RunBatch = Callable[[list[str]], Any]  # runs these texts as one batch on the model (the worker's forward)
Measure = Callable[[RunBatch, tuple[int, ...]], dict[int, float]]  # (run, sizes) -> requests/s by size


def measure_batch_curve(run: RunBatch, sizes: tuple[int, ...] = BATCH_SIZES, repeats: int = 2,
                        text: str = CALIBRATION_TEXT, budget_s: float = STARTUP_BUDGET_S,
                        clock: Clock = time.perf_counter) -> dict[int, float]:
    """Requests/s per batch size, in requests of the calibration text's length (best of `repeats`,
    or of one run when it takes LONG_RUN_S or more).

    Stops at the first size that does not beat the best so far, which keeps start-up short, and
    once `budget_s` has passed. When one request of `text` times the sum of the sizes (the whole
    curve with no gain at all) would not fit the budget, measures on a short text instead."""
    def timed(text: str, size: int) -> float:
        start = clock()
        run([text] * size)
        return clock() - start

    started = clock()
    run([SHORT_CALIBRATION_TEXT])  # warm-up: first-call costs are not a property of any batch size
    single = timed(text, 1)
    if single * sum(sizes) > budget_s and len(SHORT_CALIBRATION_TEXT) < len(text):
        log.info("batching: one calibration request takes %.1f s; measuring on a short text to keep start-up "
                 "within %.0f s", single, budget_s)
        text = SHORT_CALIBRATION_TEXT
        single = timed(text, 1)
    scale = len(text) / len(CALIBRATION_TEXT)  # -> requests of the calibration text's length
    curve: dict[int, float] = {}
    for size in sizes:
        if curve and clock() - started > budget_s:
            log.info("batching: start-up budget of %.0f s spent before batch %d; larger sizes are left to "
                     "the online refinement", budget_s, size)
            break
        times = [single] if size == 1 else []
        while len(times) < repeats and not (times and times[-1] >= LONG_RUN_S):
            times.append(timed(text, size))
        best = max(curve.values(), default=0.0)
        curve[size] = scale * size / max(min(times), 1e-9)
        if curve[size] < 1.02 * best:  # no real gain from doubling: larger batches only pad more
            break
    return curve


def choose_batch_size(curve: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest size within `tolerance` of the best throughput: a bigger batch makes each of
    its requests wait for the longest one, so it must pay for itself."""
    best = max(curve.values())
    return min(size for size, rps in curve.items() if rps >= best * (1 - tolerance))


def candidate_sizes(max_size: int, bound: int | None) -> tuple[int, ...]:
    """The sizes auto chooses from: BATCH_SIZES up to what a gather can hold (`max_size`) and the
    plan's bound; a bound between two of them is a size too (it fits, the next one up does not)."""
    limit = max(1, max_size if bound is None else min(max_size, bound))
    sizes = tuple(size for size in BATCH_SIZES if size <= limit)
    if bound is not None and limit == bound and limit < BATCH_SIZES[-1] and limit not in sizes:
        sizes += (limit,)
    return sizes


class BatchTuner:
    """The batch size to gather next: fixed, or (`auto`) measured at start-up and refined online.
    Used from the event loop, except `calibrate`, which runs on the worker thread before serving."""

    def __init__(self, max_batch: int | str = 1, *, max_size: int = BATCH_SIZES[-1], bound: int | None = None,
                 clock: Clock = time.perf_counter, measure: Measure | None = None,
                 probe_every: int = PROBE_EVERY) -> None:
        self.auto = max_batch == "auto"
        self.bound = bound  # the plan's max_batch: at most this many requests fit its VRAM budget
        self.current = 1 if self.auto else int(max_batch)  # auto without calibration starts at 1
        self.sizes = candidate_sizes(max_size, bound) if self.auto else ()
        self.clock = clock
        self.probe_every = probe_every
        self._measure = measure or (lambda run, sizes: measure_batch_curve(run, sizes, clock=self.clock))
        self.startup_curve: dict[int, float] = {}  # requests/s per batch size measured at start-up
        self.online_curve: dict[int, float] = {}  # the same, measured while serving (moving average)
        self.online_samples: dict[int, int] = {}
        self.ratios: dict[int, deque[float]] = {}  # neighbour -> log(its rate / current size's average)
        self._full_batches = 0  # batches filled up to the current size (the size limited them)
        self._probe_up = True  # the next probe's direction
        self._probe: int | None = None  # a neighbouring size the next speech batch is gathered for

    @classmethod
    def for_runtime(cls, runtime: Any, max_batch: int | str, **kwargs: Any) -> BatchTuner:
        """A tuner bounded by the plan `runtime` was loaded under (`runtime.plan`: None when not
        planned; its `max_batch` None when CPU-only)."""
        return cls(max_batch, bound=getattr(getattr(runtime, "plan", None), "max_batch", None), **kwargs)

    # -- start-up -------------------------------------------------------------------------------
    def calibrate(self, run: RunBatch) -> None:
        """auto: measure the curve with `run` (the worker's forward, on its thread) and choose."""
        if self.auto:
            self.startup_curve = self._measure(run, self.sizes)
            allowed = {size: rps for size, rps in self.startup_curve.items() if size in self.sizes}
            self.current = choose_batch_size(allowed) if allowed else 1

    def warning(self) -> str | None:
        """A fixed max_batch above the plan's bound: said at start-up, not refused (see the docstring)."""
        if self.auto or self.bound is None or self.current <= self.bound:
            return None
        return (f"batching: max_batch {self.current} is above the plan's bound of {self.bound} requests per "
                f"batch (its VRAM budget); a larger batch may run out of memory, which splits it and retries. "
                f"Set batching.max_batch to auto or at most {self.bound}")

    def describe(self) -> str:
        """The start-up line: the choice, why, and the plan's bound."""
        bound = "" if self.bound is None else f"; plan bound: at most {self.bound} requests per batch fit the budget"
        if not self.auto:
            return f"batching: max_batch {self.current}{bound}"
        if not self.startup_curve:
            return (f"batching: max_batch auto -> {self.current} (not measured at start-up: no warm-up; "
                    f"learned while serving){bound}")
        curve = ", ".join(f"{size}: {rps:.2f}" for size, rps in self.startup_curve.items())
        return f"batching: max_batch auto -> {self.current} (measured requests/s by batch size: {curve}){bound}"

    # -- serving --------------------------------------------------------------------------------
    def next_size(self) -> int:
        """How many compatible requests the next speech batch may gather: a pending probe, else the
        current choice."""
        if self._probe is not None:
            size, self._probe = self._probe, None
            return size
        return self.current

    def observe(self, size: int, chars: int, seconds: float, full: bool) -> None:
        """One speech batch of `size` requests (`chars` characters in all) took `seconds` on the
        worker; `full`: it held as many as it was gathered for. Maybe probe a neighbour, or move."""
        if not self.auto or seconds <= 0:
            return
        current = self.current
        if size == current and full:  # the size limited this batch: a neighbour might do better
            self._full_batches += 1
            candidate = self._neighbour(current, advance=False)
            # a neighbour already measured (at start-up or while serving) is re-checked 4x less
            # often: each probe of a size that does not pay costs its batch a little
            known = candidate is not None and (candidate in self.startup_curve
                                               or self.online_samples.get(candidate, 0) >= MIN_SAMPLES)
            if self._full_batches >= self.probe_every * (4 if known else 1):
                self._probe = self._neighbour(current)
                self._full_batches = 0
        if size not in self.sizes:  # a partly filled batch: the curve keeps the sizes it chooses from
            return
        rate = chars / len(CALIBRATION_TEXT) / seconds  # calibration-length requests per second
        old = self.online_curve.get(size)
        self.online_curve[size] = rate if old is None else (1 - ONLINE_ALPHA) * old + ONLINE_ALPHA * rate
        self.online_samples[size] = self.online_samples.get(size, 0) + 1
        reference = self.online_curve.get(current)
        if size in self._neighbours(current) and reference and self.online_samples.get(current, 0) >= 2:
            ratios = self.ratios.setdefault(size, deque(maxlen=RATIO_WINDOW))
            ratios.append(math.log(rate / reference))
            self._maybe_move(current, size)

    def _neighbour(self, current: int, advance: bool = True) -> int | None:
        """The size to probe next: the next size up and down, alternately, where they exist."""
        index = self.sizes.index(current) if current in self.sizes else -1
        up = self.sizes[index + 1] if 0 <= index < len(self.sizes) - 1 else None
        down = self.sizes[index - 1] if index > 0 else None
        first, second = (up, down) if self._probe_up else (down, up)
        if advance:
            self._probe_up = not self._probe_up
        return first if first is not None else second

    def _neighbours(self, current: int) -> tuple[int, ...]:
        if current not in self.sizes:
            return ()
        index = self.sizes.index(current)
        return tuple(self.sizes[i] for i in (index - 1, index + 1) if 0 <= i < len(self.sizes))

    def _maybe_move(self, current: int, size: int) -> None:
        """Move to `size` when its batches beat the current size's, beyond noise."""
        ratios = self.ratios[size]
        if len(ratios) < MIN_SAMPLES:
            return
        mean = statistics.fmean(ratios)
        error = statistics.stdev(ratios) / math.sqrt(len(ratios))
        if mean - 2 * error <= math.log(1 + MOVE_MARGIN):
            return
        self.current = size
        self._full_batches = 0
        self.ratios.clear()  # they were relative to the old size
        log.info("batching: max_batch auto %d -> %d (measured while serving: %.0f%% more requests/s over %d "
                 "batches; requests/s by batch size: %s)", current, size, 100 * math.expm1(mean), len(ratios),
                 ", ".join(f"{s}: {r:.2f}" for s, r in sorted(self.online_curve.items())))
