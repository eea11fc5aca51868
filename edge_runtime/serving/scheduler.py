"""Micro-batching scheduler: a bounded asyncio queue that gathers requests into batches.

It only queues and gathers: admission and backpressure (`queue_size`, Retry-After, shutdown),
which requests may share a batch (same kind, voice and settings, text lengths within
`length_ratio`), and how long a batch waits for companions. The worker (worker.py) asks for the
next batch with `next_batch()`, runs it and reports back with `done()`; the batch tuner
(batch_tuner.py) says how many requests a speech batch may gather. Streams and voice preparation
run alone, in arrival order.

Gathering waits for companions only while more compatible requests are expected: as many as were
recently in the system at once (queued, gathered or on the worker; over the last few seconds), so
a lone client never waits, and closed-loop clients whose previous answers just went out are caught
when they post again instead of leaving them for the next batch (with no wait at all, 8 clients
at max_batch 8 settle into alternating batches of 1 and 7). The wait is at most `max_wait_ms`, or,
when that is 0, a tenth of a batch's measured compute time (`AUTO_WAIT_FRACTION`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edge_runtime.serving.batch_tuner import BatchTuner

log = logging.getLogger(__name__)

AUTO_WAIT_FRACTION = 0.1  # max_wait_ms 0: wait for expected companions up to this share of a batch's time
LOAD_HORIZON_S = 2.0  # how far back "recently in the system" looks (at least 3 batches' time)

END_OF_STREAM = object()  # put after a stream's last chunk


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
    enqueued: float  # clock() at submission
    deadline: float  # clock() after which nobody waits for the result
    text: str = ""
    voice: Any = None
    settings: dict = field(default_factory=dict)
    fn: Callable[[], Any] | None = None
    chunks: asyncio.Queue | None = None
    cancelled: bool = False  # read by the worker thread between steps
    started: float | None = None  # clock() when the worker took it (streams)
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


@dataclass(eq=False)
class Batch:
    """What the worker runs at once: one stream or call, or up to `size` compatible speech requests."""

    jobs: list[Job]
    size: int  # how many it was gathered for

    @property
    def kind(self) -> str:
        return self.jobs[0].kind

    @property
    def full(self) -> bool:
        """The size limited it (more requests might have joined a larger batch)."""
        return len(self.jobs) >= self.size


@dataclass
class SpeechResult:
    audio: np.ndarray
    sample_rate: int
    batch_size: int
    compute_s: float  # the forward(s) of the batch that carried this request
    queued_s: float


class ChunkStream:
    """Async iterator over a streamed request's audio chunks as the worker produces them.
    `aclose()` (a disconnect) stops the worker at its next chunk; the deadline raises TimeoutError."""

    def __init__(self, job: Job, clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self.clock = clock

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> np.ndarray:
        job = self.job
        try:
            item = await asyncio.wait_for(job.chunks.get(), max(0.0, job.deadline - self.clock()))
        except BaseException:
            job.cancel()
            raise
        if item is END_OF_STREAM:
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


class Scheduler:
    """`tuner` says how many requests a speech batch may gather (its `next_size()`) and what the
    current choice is (`current`); `clock` (seconds, monotonic) is injectable for tests."""

    def __init__(self, tuner: BatchTuner, *, max_wait_ms: float = 0.0, queue_size: int = 32,
                 request_timeout_s: float = 300.0, length_ratio: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tuner = tuner
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.length_ratio = length_ratio
        self.clock = clock
        self._pending: deque[Job] = deque()
        self._gathering: list[Job] = []  # taken from the queue, not yet on the worker
        self._running: list[Job] = []  # handed to the worker, not yet done
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()  # closing, and the worker has finished everything
        self._closing = False
        self._load: dict[tuple, deque[tuple[float, int]]] = {}  # batch key -> (time, compatible requests in the system)
        self._batch_s = 0.0  # moving average of a speech batch's worker seconds (the gather wait)
        self._service_s = 1.0  # moving average of seconds per request, for Retry-After

    # -- state ----------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        """The batch size gathered up to now (auto refines it while serving)."""
        return self.tuner.current

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

    async def close(self, timeout: float | None = None) -> None:
        """Take no new work; wait (up to `timeout`) until the worker has finished what is queued,
        then drop what is left."""
        self._closing = True
        self._arrived.set()  # a waiting next_batch() sees the end
        if not self.depth and not self._gathering and not self._running:
            self._drained.set()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("scheduler: %d queued request(s) dropped at shutdown", self.depth)
            for job in self._pending:
                job.cancel()

    # -- submitting -----------------------------------------------------------------------------
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
        now = self.clock()
        return Job(kind, asyncio.get_running_loop().create_future(), now, now + self.request_timeout_s, **kwargs)

    async def _wait(self, job: Job) -> Any:
        try:
            return await asyncio.wait_for(job.future, max(0.0, job.deadline - self.clock()))
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
        job = self._job("stream", text=text, voice=voice, settings=settings, chunks=asyncio.Queue())
        return ChunkStream(self._submit(job), self.clock)

    # -- handing batches to the worker ------------------------------------------------------------
    async def next_batch(self) -> Batch | None:
        """The oldest live request and (speech) the compatible ones gathered with it; waits for work.
        None once closing with nothing left: the worker stops."""
        while (head := self._take()) is None:
            if self._closing:
                self._drained.set()
                return None
            self._arrived.clear()
            await self._arrived.wait()
        batch = Batch([head], self.tuner.next_size() if head.kind == "speech" else 1)
        if batch.size > 1:
            self._gathering = batch.jobs
            try:
                await self._gather(batch.jobs, batch.size)
            finally:
                self._gathering = []
        self._running = batch.jobs
        return batch

    def done(self, batch: Batch, seconds: float, measured: bool) -> None:
        """The worker finished `batch` in `seconds`; `measured`: a speech batch that ran whole (a
        failed or thinned one says nothing about how long a batch takes)."""
        self._running = []
        self._service_s = 0.8 * self._service_s + 0.2 * seconds / len(batch.jobs)
        if measured:
            self._batch_s = seconds if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * seconds

    def _take(self, accept: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """Remove and return the first live job that `accept`s; drop cancelled and expired ones."""
        now = self.clock()
        for job in list(self._pending):
            if job.cancelled or now > job.deadline:
                self._pending.remove(job)
                job.cancel() if job.cancelled else job.expire()
                continue
            if accept(job):
                self._pending.remove(job)
                return job
        return None

    def _compatible(self, head: Job) -> Callable[[Job], bool]:
        key, size = head.batch_key, max(1, len(head.text))
        return lambda job: (job.batch_key == key
                            and max(size, len(job.text)) <= self.length_ratio * max(1, min(size, len(job.text))))

    async def _gather(self, batch: list[Job], size: int) -> None:
        """Add compatible queued requests up to `size`; wait for more only while the recent load
        says they are coming (see the module docstring)."""
        accept = self._compatible(batch[0])
        expected = min(size, self.expected_load(batch[0]))
        wait = self.max_wait_s if self.max_wait_s > 0 else AUTO_WAIT_FRACTION * self._batch_s
        deadline = self.clock() + wait
        while len(batch) < size:
            job = self._take(accept)
            if job is not None:
                batch.append(job)
                continue
            remaining = deadline - self.clock()
            if len(batch) >= expected or remaining <= 0 or self._closing:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    # -- load: how many companions a batch can expect ------------------------------------------
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
        now = self.clock()
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
        since = self.clock() - self._load_horizon()
        return max((count for when, count in history if when >= since), default=1)
