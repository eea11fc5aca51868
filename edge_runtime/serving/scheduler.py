"""Micro-batching scheduler: a bounded asyncio queue in front of ONE inference worker thread.

The event loop only schedules (queue, gather, cancel, time out); the worker thread only runs the
model. One worker because one request already keeps every core (or the GPU) busy: more threads
would only interleave forwards. Requests with the same voice and settings and similar text lengths
are gathered into one `synthesize_batch` call, up to `max_batch`. Streams and voice preparation run
alone, in arrival order.

Gathering waits for companions only while more compatible requests are expected: as many as were
recently in the system at once (queued, gathered or on the worker; over the last few seconds), so
a lone client never waits, and closed-loop clients whose previous answers just went out are caught
when they post again instead of leaving them for the next batch (with no wait at all, 8 clients
at max_batch 8 settle into alternating batches of 1 and 7). The wait is at most `max_wait_ms`, or,
when that is 0, a tenth of a batch's measured compute time (`AUTO_WAIT_FRACTION`).

`max_batch: auto` measures requests/s per batch size at start-up (batch_tuning.py) and then keeps
refining the choice while serving: every speech batch's throughput (characters per worker second,
in requests of the calibration text's length per second, so batches of other texts compare) is
folded into a moving average per batch size (`online_curve`); while batches fill up to the current
size, every `PROBE_EVERY`-th one is run at a neighbouring size (double or half, alternately; one
already measured, at start-up or while serving, only every 4 x `PROBE_EVERY`-th). Each batch at a
neighbouring size is compared with the current size's moving average at that moment (a paired
comparison: the machine's slow drift cancels), and the choice moves to the neighbour once at
least `MIN_SAMPLES` such ratios say it is better by more than `MOVE_MARGIN` with two standard
errors to spare; one batch's time varies by +-20% on a shared 2-core VM, and comparing moving
averages taken minutes apart moved on noise. A probe up that the load cannot fill simply runs the
batch it got.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.serving.batch_tuner import (BATCH_SIZES, CALIBRATION_TEXT, SHORT_CALIBRATION_TEXT, choose_batch_size,
                           measure_batch_curve)

log = logging.getLogger(__name__)

AUTO_WAIT_FRACTION = 0.1  # max_wait_ms 0: wait for expected companions up to this share of a batch's time
LOAD_HORIZON_S = 2.0  # how far back "recently in the system" looks (at least 3 batches' time)
# online refinement of max_batch auto
ONLINE_ALPHA = 0.3  # weight of a new sample in a batch size's moving average
PROBE_EVERY = 8  # while batches fill up, one in this many tries a neighbouring size (x4 once known)
MIN_SAMPLES = 4  # compared batches a neighbour needs before the choice may move to it
MOVE_MARGIN = 0.03  # ... and how much better than the current size it must be (beyond 2 standard errors)
RATIO_WINDOW = 16  # the most recent comparisons kept per neighbour

_END = object()  # end of a stream's chunks


class QueueFullError(Exception):
    """The queue holds `queue_size` requests; `retry_after` (s) estimates when a slot frees."""

    def __init__(self, queue_size: int, retry_after: int) -> None:
        super().__init__(f"server busy: {queue_size} requests already queued; retry in {retry_after} s")
        self.retry_after = retry_after


class SchedulerClosedError(Exception):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False)
class Job:
    kind: str  # "speech" (batchable), "stream" or "call"
    future: asyncio.Future
    deadline: float  # time.monotonic() after which nobody waits for the result
    text: str = ""
    voice: Any = None
    settings: dict = field(default_factory=dict)
    fn: Callable[[], Any] | None = None
    chunks: asyncio.Queue | None = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # read by the worker thread between steps
    started: float | None = None  # time.monotonic() when the worker took it (streams)
    finished: float | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()

    def expire(self) -> None:
        """Its deadline passed while queued: the caller (if still there) gets a TimeoutError."""
        self.cancelled = True
        error = TimeoutError("request timed out waiting in the queue")
        if not self.future.done():
            self.future.set_exception(error)
        if self.chunks is not None:
            self.chunks.put_nowait(error)

    @functools.cached_property
    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch (settings never change after submission)."""
        return (self.kind, self.voice, tuple(sorted(self.settings.items())))


class ChunkStream:
    """Async iterator over a streamed request's audio chunks as the worker produces them.
    `aclose()` (a disconnect) stops the worker at its next chunk; the deadline raises TimeoutError."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> np.ndarray:
        job = self.job
        try:
            item = await asyncio.wait_for(job.chunks.get(), max(0.0, job.deadline - time.monotonic()))
        except BaseException:
            job.cancel()
            raise
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            job.cancel()
            raise item
        return item

    async def aclose(self) -> None:
        self.job.cancel()

    @property
    def compute_s(self) -> float | None:
        """Worker seconds spent on this stream, once it finished."""
        job = self.job
        return None if job.started is None or job.finished is None else job.finished - job.started


@dataclass
class SpeechResult:
    audio: np.ndarray
    sample_rate: int
    batch_size: int
    compute_s: float  # the forward(s) of the batch that carried this request
    queued_s: float


class Scheduler:
    def __init__(self, runtime: Any, *, max_batch: int | str = 1, max_wait_ms: float = 0.0,
                 queue_size: int = 32, request_timeout_s: float = 300.0, length_ratio: float = 2.0,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.runtime = runtime
        self.auto = max_batch == "auto"
        self.max_batch = 1 if self.auto else int(max_batch)
        self.batch_curve: dict[int, float] = {}  # auto: requests/s per batch size measured at start-up
        self.online_curve: dict[int, float] = {}  # auto: the same, measured while serving (moving average)
        self.online_samples: dict[int, int] = {}
        self._ratios: dict[int, deque[float]] = {}  # neighbour -> log(its rate / current size's average)
        self.sizes: tuple[int, ...] = ()  # auto: the sizes it may choose from
        self._full_batches = 0  # batches filled up to max_batch (the size limited them), for probing
        self._probe_up = True  # the next probe's direction
        self._probe: int | None = None  # a neighbouring size the next full batch runs at
        self._batch_s = 0.0  # moving average of a speech batch's worker seconds
        self._load: dict[tuple, deque[tuple[float, int]]] = {}  # batch key -> (time, compatible requests in the system)
        self._gathering: list[Job] = []  # taken from the queue, not yet on the worker
        self._running: list[Job] = []
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.length_ratio = length_ratio
        self.on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runtime-inference")
        self._dispatcher: asyncio.Task | None = None
        self._closing = False
        self._service_s = 1.0  # moving average of seconds per request, for Retry-After

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, warm_up: bool = True) -> None:
        """Warm the model up (and measure the batch curve for `max_batch: auto`) on the worker
        thread, then start dispatching. Without warm-up, auto starts at 1 and learns while serving."""
        loop = asyncio.get_running_loop()
        if self.auto:
            self.sizes = tuple(size for size in BATCH_SIZES if size <= self.queue_size + 1)  # what a gather can hold
            if warm_up:
                self.batch_curve = await loop.run_in_executor(
                    self._executor, functools.partial(measure_batch_curve, self.runtime, self.sizes))
                self.max_batch = choose_batch_size(self.batch_curve)
        elif warm_up:
            await loop.run_in_executor(self._executor, self.runtime.synthesize, SHORT_CALIBRATION_TEXT)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="edge-runtime-dispatcher")

    async def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued (within `timeout`), then stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._dispatcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._dispatcher), timeout)
            except asyncio.TimeoutError:
                log.warning("scheduler: %d queued request(s) dropped at shutdown", len(self._pending))
                for job in self._pending:
                    job.cancel()
                self._dispatcher.cancel()
        self._executor.shutdown(wait=True)  # the forward in progress, if any, completes

    @property
    def running(self) -> int:
        """Requests on the worker now."""
        return len(self._running)

    @property
    def depth(self) -> int:
        return sum(not job.cancelled for job in self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth."""
        return max(1, math.ceil(self._service_s * (self.depth + self.running) / max(1, self.max_batch)))

    # -- submitting ---------------------------------------------------------------------------
    def _submit(self, job: Job) -> Job:
        if self._closing:
            raise SchedulerClosedError("server is shutting down; no new requests")
        if len(self._pending) >= self.queue_size:  # forget callers that left before counting
            self._pending = deque(j for j in self._pending if not j.cancelled)
        if len(self._pending) >= self.queue_size:
            raise QueueFullError(self.queue_size, self.retry_after())
        self._pending.append(job)
        self._note_load(job)
        self._arrived.set()
        return job

    def _job(self, kind: str, **kwargs: Any) -> Job:
        loop = asyncio.get_running_loop()
        return Job(kind, loop.create_future(), time.monotonic() + self.request_timeout_s, **kwargs)

    async def _wait(self, job: Job) -> Any:
        try:
            return await asyncio.wait_for(job.future, max(0.0, job.deadline - time.monotonic()))
        finally:
            job.cancel()  # timed out or the caller went away: drop it from the queue / ignore its result

    async def synthesize(self, text: str, voice: Any = None, **settings: Any) -> SpeechResult:
        """The whole utterance; batched with compatible requests. Cancelling the caller cancels it."""
        return await self._wait(self._submit(self._job("speech", text=text, voice=voice, settings=settings)))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` alone on the inference worker (e.g. preparing a voice prompt)."""
        return await self._wait(self._submit(self._job("call", fn=fn)))

    def stream(self, text: str, voice: Any = None, **settings: Any) -> ChunkStream:
        """Queue a streamed request now (QueueFullError here) and return its chunks' iterator."""
        return ChunkStream(self._submit(self._job("stream", text=text, voice=voice, settings=settings,
                                                  chunks=asyncio.Queue())))

    # -- dispatching (event loop) -------------------------------------------------------------
    def _take(self, accept: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """Remove and return the first live job that `accept`s; drop cancelled and expired ones."""
        now = time.monotonic()
        for job in list(self._pending):
            if job.cancelled or now > job.deadline:
                self._pending.remove(job)
                job.cancel() if job.cancelled else job.expire()
                continue
            if accept(job):
                self._pending.remove(job)
                return job
        return None

    # -- load: how many companions a batch can expect ----------------------------------------
    def _load_horizon(self) -> float:
        return max(LOAD_HORIZON_S, 3 * self._batch_s)

    def _note_load(self, job: Job) -> None:
        """On arrival: how many requests compatible with `job` are in the system now (queued,
        gathered, on the worker), itself included."""
        if job.kind != "speech":
            return
        key = job.batch_key
        here = sum(not j.cancelled and j.batch_key == key
                   for j in (*self._pending, *self._gathering, *self._running))
        now = time.monotonic()
        since = now - self._load_horizon()
        for other in [k for k, h in self._load.items() if h[-1][0] < since]:  # voices no longer in use
            del self._load[other]
        history = self._load.setdefault(key, deque())
        history.append((now, here))
        while history[0][0] < since:
            history.popleft()

    def expected_load(self, head: Job) -> int:
        """Compatible requests recently in the system at once (1 when none were)."""
        history = self._load.get(head.batch_key, ())
        since = time.monotonic() - self._load_horizon()
        return max((count for when, count in history if when >= since), default=1)

    def _compatible(self, head: Job) -> Callable[[Job], bool]:
        key, size = head.batch_key, max(1, len(head.text))
        return lambda job: (job.batch_key == key
                            and max(size, len(job.text)) <= self.length_ratio * max(1, min(size, len(job.text))))

    async def _dispatch(self) -> None:
        while True:
            head = self._take()
            if head is None:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = [head]
            size = self.max_batch
            if head.kind == "speech" and self._probe is not None:
                size, self._probe = self._probe, None
            if head.kind == "speech" and size > 1:
                self._gathering = batch
                try:
                    await self._gather(batch, size)
                finally:
                    self._gathering = []
            await self._run(batch, size)

    async def _gather(self, batch: list[Job], size: int) -> None:
        """Add compatible queued requests up to `size`; wait for more only while the recent load
        says they are coming (see the module docstring)."""
        accept = self._compatible(batch[0])
        expected = min(size, self.expected_load(batch[0]))
        wait = self.max_wait_s if self.max_wait_s > 0 else AUTO_WAIT_FRACTION * self._batch_s
        deadline = time.monotonic() + wait
        while len(batch) < size:
            job = self._take(accept)
            if job is not None:
                batch.append(job)
                continue
            remaining = deadline - time.monotonic()
            if len(batch) >= expected or remaining <= 0 or self._closing:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self, batch: list[Job], size: int = 1) -> None:
        loop = asyncio.get_running_loop()
        head = batch[0]
        self._running = batch
        start = time.monotonic()
        try:
            if head.kind == "stream":
                await loop.run_in_executor(self._executor, self._run_stream, head, loop)
                return
            work = self._run_speech if head.kind == "speech" else self._run_call
            outcomes = await loop.run_in_executor(self._executor, work, batch)
        except Exception as exc:  # noqa: BLE001 - the worker itself failed: every caller learns why
            if head.chunks is not None:
                head.chunks.put_nowait(exc)
            outcomes = [exc] * len(batch)
        finally:
            self._running = []
            elapsed = time.monotonic() - start
            self._service_s = 0.8 * self._service_s + 0.2 * elapsed / len(batch)
        if head.kind == "speech":
            # a failed or thinned (cancelled) batch measures nothing
            if all(isinstance(outcome, SpeechResult) for outcome in outcomes):
                self._batch_s = elapsed if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * elapsed
                self._learn(len(batch), sum(len(job.text) for job in batch), elapsed, full=len(batch) >= size)
            if self.on_batch is not None:
                self.on_batch(len(batch), elapsed)
        for job, outcome in zip(batch, outcomes):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    # -- online refinement of max_batch auto ------------------------------------------------------
    def _learn(self, size: int, chars: int, seconds: float, full: bool) -> None:
        """Fold one speech batch into the online curve; maybe probe a neighbour or move to it."""
        if not self.auto or seconds <= 0:
            return
        current = self.max_batch
        if size == current and full:  # the size limited this batch: a neighbour might do better
            self._full_batches += 1
            candidate = self._neighbour(current, advance=False)
            # a neighbour already measured (at start-up or while serving) is re-checked 4x less
            # often: each probe of a size that does not pay costs its batch a little
            known = candidate is not None and (candidate in self.batch_curve
                                               or self.online_samples.get(candidate, 0) >= MIN_SAMPLES)
            if self._full_batches >= PROBE_EVERY * (4 if known else 1):
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
            ratios = self._ratios.setdefault(size, deque(maxlen=RATIO_WINDOW))
            ratios.append(math.log(rate / reference))
            self._maybe_move(current, size)

    def _neighbour(self, current: int, advance: bool = True) -> int | None:
        """The size to probe next: double and half of `current`, alternately, where they exist."""
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
        ratios = self._ratios[size]
        if len(ratios) < MIN_SAMPLES:
            return
        mean = statistics.fmean(ratios)
        error = statistics.stdev(ratios) / math.sqrt(len(ratios))
        if mean - 2 * error <= math.log(1 + MOVE_MARGIN):
            return
        self.max_batch = size
        self._full_batches = 0
        self._ratios.clear()  # they were relative to the old size
        log.info("batching: max_batch auto %d -> %d (measured while serving: %.0f%% more requests/s over %d "
                 "batches; requests/s by batch size: %s)", current, size, 100 * math.expm1(mean), len(ratios),
                 ", ".join(f"{s}: {r:.2f}" for s, r in sorted(self.online_curve.items())))

    # -- the worker thread --------------------------------------------------------------------
    def _run_call(self, batch: list[Job]) -> list[Any]:
        job = batch[0]
        if job.cancelled:
            return [None]
        try:
            return [job.fn()]
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            return [exc]

    def _run_speech(self, batch: list[Job]) -> list[Any]:
        live = [job for job in batch if not job.cancelled]  # cancelled while waiting for the worker
        if not live:
            return [None] * len(batch)
        rt, head = self.runtime, live[0]
        start = time.perf_counter()
        queued = {job: max(0.0, time.monotonic() - job.enqueued) for job in live}
        try:
            if len(live) == 1:
                audios = [rt.synthesize(head.text, voice=head.voice, **head.settings)[0]]
            else:
                audios = [a for a, _ in rt.synthesize_batch([j.text for j in live], voice=head.voice,
                                                             max_batch=len(live), **head.settings)]
        except Exception as exc:  # noqa: BLE001 - isolate the failing request: run the others alone
            if len(live) == 1:
                return [exc if job is head else None for job in batch]
            return [out for job in batch for out in self._run_speech([job])]
        compute = time.perf_counter() - start
        results = {job: SpeechResult(audio, rt.sample_rate, len(live), compute, queued[job])
                   for job, audio in zip(live, audios)}
        return [results.get(job) for job in batch]

    def _run_stream(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        def put(item: Any) -> None:
            loop.call_soon_threadsafe(job.chunks.put_nowait, item)

        if job.cancelled:
            return
        chunks = None
        job.started = time.monotonic()
        try:
            chunks = self.runtime.stream(job.text, voice=job.voice, **job.settings)
            for chunk in chunks:
                if job.cancelled or time.monotonic() > job.deadline:
                    return  # nobody reads on: stop computing
                put(chunk)
            job.finished = time.monotonic()
            put(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            put(exc)
        finally:
            if chunks is not None:
                chunks.close()  # releases the request (telemetry, cleanup) even when stopped early

