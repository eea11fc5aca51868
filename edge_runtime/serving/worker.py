"""The inference worker: runs the batches the scheduler gathered on ONE thread, and only that.

One thread because one request already keeps every core (or the GPU) busy: more threads would only
interleave forwards. The worker calls the Runtime's public API only (synthesize, synthesize_batch,
stream), hands every request its result or error, and reports each speech batch's measured time to
the batch tuner (and to the metrics hook). Its loop is the engine loop: ask the scheduler for the
next batch, run it, tell the scheduler it is done.

    worker = Worker(runtime, tuner)
    await worker.warm_up()           # auto: the tuner measures its curve through this worker
    worker.start(scheduler)
    ...
    await scheduler.close(timeout)   # no new work; what is queued finishes
    await worker.close()             # the forward in progress completes; the thread stops
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_runtime.serving.batch_tuner import SHORT_CALIBRATION_TEXT, BatchTuner
from edge_runtime.serving.scheduler import END_OF_STREAM, Batch, Job, Scheduler, SpeechResult


class Worker:
    """`clock` (seconds, monotonic; the scheduler's, since deadlines are compared with it) is
    injectable for tests; `on_batch(size, seconds)` hears every speech batch (metrics)."""

    def __init__(self, runtime: Any, tuner: BatchTuner, *, clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.runtime = runtime
        self.tuner = tuner
        self.clock = clock
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runtime-inference")
        self._task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def warm_up(self, enabled: bool = True) -> None:
        """Before the first request, on the worker thread: `max_batch: auto` measures its batch curve
        (which warms the model up too); a fixed size runs one short synthesis so the first request is
        not slower than the rest. Without warm-up, auto starts at 1 and learns while serving."""
        if not enabled:
            return
        loop = asyncio.get_running_loop()
        if self.tuner.auto:
            await loop.run_in_executor(self._executor, self.tuner.calibrate, self.forward)
        else:
            await loop.run_in_executor(self._executor, self.forward, [SHORT_CALIBRATION_TEXT])

    def start(self, scheduler: Scheduler) -> None:
        self._task = asyncio.create_task(self._serve(scheduler), name="edge-runtime-worker")

    async def close(self) -> None:
        """After `scheduler.close()`: the loop has ended, or (the scheduler gave up waiting) is
        cancelled; the forward in progress, if any, completes before the thread stops."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def _serve(self, scheduler: Scheduler) -> None:
        while (batch := await scheduler.next_batch()) is not None:
            seconds, measured = await self.run(batch)
            scheduler.done(batch, seconds, measured)

    # -- one batch (event loop) -------------------------------------------------------------------
    async def run(self, batch: Batch) -> tuple[float, bool]:
        """Run `batch` on the worker thread and settle its requests. Returns its worker seconds and
        whether they measure the batch (a speech batch where every request got audio)."""
        loop = asyncio.get_running_loop()
        jobs, head = batch.jobs, batch.jobs[0]
        reloads = self._reloads()
        start = self.clock()
        try:
            if head.kind == "stream":
                await loop.run_in_executor(self._executor, self._run_stream, head, loop)
                return self.clock() - start, False
            work = self._run_speech if head.kind == "speech" else self._run_call
            outcomes = await loop.run_in_executor(self._executor, work, jobs)
        except Exception as exc:  # noqa: BLE001 - the worker itself failed: every caller learns why
            if head.chunks is not None:
                head.chunks.put_nowait(exc)
            outcomes = [exc] * len(jobs)
        seconds = self.clock() - start
        measured = head.kind == "speech" and all(isinstance(outcome, SpeechResult) for outcome in outcomes)
        measured = measured and self._reloads() == reloads  # a batch that reloaded an idle model: not its speed
        if measured:  # a failed or thinned (cancelled) batch measures nothing
            self.tuner.observe(len(jobs), sum(len(job.text) for job in jobs), seconds, full=batch.full)
        if head.kind == "speech" and self.on_batch is not None:
            self.on_batch(len(jobs), seconds)
        for job, outcome in zip(jobs, outcomes):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        return seconds, measured

    def _reloads(self) -> int:
        """Times the runtime reloaded its model after an idle unload (runtime.keep_alive_s)."""
        keep_alive = getattr(self.runtime, "keep_alive", None)
        return getattr(keep_alive, "reloads", 0)

    # -- the worker thread ------------------------------------------------------------------------
    def forward(self, texts: list[str]) -> Any:
        """`texts` as one batch with the default voice and settings (the tuner's measurements)."""
        if len(texts) == 1:
            return self.runtime.synthesize(texts[0])
        return self.runtime.synthesize_batch(texts, max_batch=len(texts))

    def _run_call(self, jobs: list[Job]) -> list[Any]:
        job = jobs[0]
        if job.cancelled:
            return [None]
        try:
            return [job.fn()]
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            return [exc]

    def _run_speech(self, jobs: list[Job]) -> list[Any]:
        live = [job for job in jobs if not job.cancelled]  # cancelled while waiting for the worker
        if not live:
            return [None] * len(jobs)
        rt, head = self.runtime, live[0]
        start = self.clock()
        queued = {job: max(0.0, start - job.enqueued) for job in live}
        try:
            if len(live) == 1:
                audios = [rt.synthesize(head.text, voice=head.voice, **head.settings)[0]]
            else:
                audios = [a for a, _ in rt.synthesize_batch([j.text for j in live], voice=head.voice,
                                                             max_batch=len(live), **head.settings)]
        except Exception as exc:  # noqa: BLE001 - isolate the failing request: run the others alone
            if len(live) == 1:
                return [exc if job is head else None for job in jobs]
            return [out for job in jobs for out in self._run_speech([job])]
        compute = self.clock() - start
        results = {job: SpeechResult(audio, rt.sample_rate, len(live), compute, queued[job])
                   for job, audio in zip(live, audios)}
        return [results.get(job) for job in jobs]

    def _run_stream(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        def put(item: Any) -> None:
            loop.call_soon_threadsafe(job.chunks.put_nowait, item)

        if job.cancelled:
            return
        chunks = None
        job.started = self.clock()
        try:
            chunks = self.runtime.stream(job.text, voice=job.voice, **job.settings)
            for chunk in chunks:
                if job.cancelled or self.clock() > job.deadline:
                    return  # nobody reads on: stop computing
                put(chunk)
            job.finished = self.clock()
            put(END_OF_STREAM)
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            put(exc)
        finally:
            if chunks is not None:
                chunks.close()  # releases the request (telemetry, cleanup) even when stopped early
