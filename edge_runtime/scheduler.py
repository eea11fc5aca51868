"""Micro-batching scheduler: a bounded asyncio queue in front of ONE inference worker thread.

The event loop only schedules (queue, gather, cancel, time out); the worker thread only runs the
model. One worker because one request already keeps every core (or the GPU) busy: more threads
would only interleave forwards. Requests with the same voice and settings and similar text lengths
are gathered into one `synthesize_batch` call, up to `max_batch`, waiting at most `max_wait_ms`
for companions. Streams and voice preparation run alone, in arrival order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batch_tuning import BATCH_SIZES, CALIBRATION_TEXT, choose_batch_size, measure_batch_curve

log = logging.getLogger(__name__)

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

    def batch_key(self) -> tuple:
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
        self.batch_curve: dict[int, float] = {}
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
        self.running = 0  # requests on the worker now

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, warm_up: bool = True) -> None:
        """Warm the model up (and measure the batch curve for `max_batch: auto`) on the worker
        thread, then start dispatching."""
        loop = asyncio.get_running_loop()
        if self.auto:
            sizes = tuple(size for size in BATCH_SIZES if size <= self.queue_size + 1)  # what a gather can hold
            self.batch_curve = await loop.run_in_executor(
                self._executor, functools.partial(measure_batch_curve, self.runtime, sizes))
            self.max_batch = choose_batch_size(self.batch_curve)
        elif warm_up:
            await loop.run_in_executor(self._executor, self.runtime.synthesize, CALIBRATION_TEXT)
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

    def _compatible(self, head: Job) -> Callable[[Job], bool]:
        key, size = head.batch_key(), max(1, len(head.text))
        return lambda job: (job.batch_key() == key
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
            if head.kind == "speech" and self.max_batch > 1:
                await self._gather(batch)
            await self._run(batch)

    async def _gather(self, batch: list[Job]) -> None:
        accept = self._compatible(batch[0])
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            job = self._take(accept)
            if job is not None:
                batch.append(job)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        head = batch[0]
        self.running = len(batch)
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
            self.running = 0
            elapsed = time.monotonic() - start
            self._service_s = 0.8 * self._service_s + 0.2 * elapsed / len(batch)
        if head.kind == "speech" and self.on_batch is not None:
            self.on_batch(len(batch), elapsed)
        for job, outcome in zip(batch, outcomes):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

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

