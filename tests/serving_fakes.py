"""Fakes for the scheduler, worker and batch-tuner tests: a simulated clock that only the fake
model's work advances, runtimes whose forwards cost simulated seconds, and the serving stack wired
as the server wires it (tuner -> worker warm-up -> scheduler -> worker loop)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import InvalidInputError
from edge_runtime.serving.batch_tuner import PROBE_EVERY, BatchTuner
from edge_runtime.serving.scheduler import Scheduler
from edge_runtime.serving.worker import Worker


class FakeClock:
    """Simulated seconds: the fake model's work advances them (from the worker thread), waiting never does."""

    def __init__(self) -> None:
        self._now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class FakeRuntime:
    """Records each call as the list of texts it carried; a batch of n costs `batch_cost[n]`
    simulated seconds; `gate` holds the worker until set, `entered` says a call reached the model."""

    sample_rate = 100

    def __init__(self, batch_cost: dict[int, float] | None = None, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_cost = batch_cost or {}
        self.streamed = 0
        self.stream_paused = threading.Event()  # the stream produced its first `pause_after` chunks
        self.stream_resume = threading.Event()
        self.stream_closed = threading.Event()

    def synthesize(self, text, voice=None, **settings):
        self.entered.set()
        self.gate.wait()
        if text == "bad":
            raise InvalidInputError("bad text")
        self.calls.append([text])
        self.clock.advance(self.batch_cost.get(1, 0.0))
        return np.full(len(text), 0.5, np.float32), self.sample_rate

    def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
        self.entered.set()
        self.gate.wait()
        if "bad" in texts:
            raise InvalidInputError("bad text in batch")
        self.calls.append(list(texts))
        self.clock.advance(self.batch_cost.get(len(texts), 0.0))
        return [(np.full(len(t), 0.5, np.float32), self.sample_rate) for t in texts]

    def stream(self, text, voice=None, pause_after: int = 3, **settings):
        def chunks():
            try:
                for index in range(1000):
                    if index == pause_after:  # hold here until the test has read (and maybe left)
                        self.stream_paused.set()
                        self.stream_resume.wait()
                    self.streamed += 1
                    yield np.zeros(10, np.float32)
            finally:
                self.stream_closed.set()
        return chunks()


def run_on(runtime):
    """The worker's forward for `measure_batch_curve`: these texts as one batch."""
    return lambda texts: (runtime.synthesize(texts[0]) if len(texts) == 1
                          else runtime.synthesize_batch(texts, max_batch=len(texts)))


@dataclass
class Stack:
    scheduler: Scheduler
    worker: Worker
    tuner: BatchTuner

    async def close(self) -> None:
        await self.scheduler.close()
        await self.worker.close()


async def started(rt, max_batch: int | str = 1, *, warm_up: bool | None = None, max_wait_ms: float = 0.0,
                  queue_size: int = 32, request_timeout_s: float = 300.0, measure=None,
                  probe_every: int = PROBE_EVERY) -> Stack:
    """The stack as the server builds it, on `rt.clock`; warmed up (which measures the curve) only
    for max_batch auto by default."""
    clock = rt.clock
    tuner = BatchTuner.for_runtime(rt, max_batch, max_size=queue_size + 1, clock=clock, measure=measure,
                                   probe_every=probe_every)
    worker = Worker(rt, tuner, clock=clock)
    await worker.warm_up(max_batch == "auto" if warm_up is None else warm_up)
    scheduler = Scheduler(tuner, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          request_timeout_s=request_timeout_s, clock=clock)
    worker.start(scheduler)
    return Stack(scheduler, worker, tuner)


async def until(condition) -> None:
    """Let the event loop run until `condition()` holds (it must depend on the loop only, not on
    another thread)."""
    while not condition():
        await asyncio.sleep(0)


async def until_set(event) -> None:
    """Wait for a threading.Event set by the worker thread, without blocking the loop (the limit
    only keeps a broken worker from hanging the suite)."""
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, 120)


async def closed_loop(scheduler: Scheduler, clients: int, each: int, text: str = "abcd") -> list:
    """`clients` callers, each sending its next request a few event-loop turns after its previous
    answer (client i after i + 1 turns: an HTTP round trip brings them back one by one, not all in
    one turn)."""
    async def client(index: int) -> list:
        results = []
        for _ in range(each):
            results.append(await scheduler.synthesize(text))
            for _ in range(index + 1):
                await asyncio.sleep(0)
        return results

    results = await asyncio.gather(*(client(i) for i in range(clients)))
    return [r for per_client in results for r in per_client]


def per_request_cost(costs: dict[int, float]) -> dict[int, float]:
    """Batch size -> seconds for the whole batch, from seconds per request at some sizes (others
    take the nearest smaller size's)."""
    out, last = {}, None
    for size in range(1, 17):
        last = costs.get(size, last)
        out[size] = last * size
    return out
