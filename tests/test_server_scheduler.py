"""The micro-batching scheduler with a fake runtime (no model): what it gathers, what it refuses,
cancellation, timeouts, streams, and how `max_batch: auto` chooses."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from edge_runtime.errors import InvalidInputError
from edge_runtime.serving.batch_tuner import choose_batch_size, measure_batch_curve
from edge_runtime.serving.scheduler import QueueFullError, Scheduler, SchedulerClosedError


class FakeRuntime:
    """Records each call as the list of texts it carried; `gate` holds the worker until set."""

    sample_rate = 100

    def __init__(self, batch_cost: dict[int, float] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.batch_cost = batch_cost or {}
        self.streamed = 0
        self.stream_closed = threading.Event()

    def synthesize(self, text, voice=None, **settings):
        self.gate.wait()
        if text == "bad":
            raise InvalidInputError("bad text")
        self.calls.append([text])
        time.sleep(self.batch_cost.get(1, 0.0))
        return np.full(len(text), 0.5, np.float32), self.sample_rate

    def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
        self.gate.wait()
        if "bad" in texts:
            raise InvalidInputError("bad text in batch")
        self.calls.append(list(texts))
        time.sleep(self.batch_cost.get(len(texts), 0.0))
        return [(np.full(len(t), 0.5, np.float32), self.sample_rate) for t in texts]

    def stream(self, text, voice=None, **settings):
        def chunks():
            try:
                for _ in range(1000):
                    self.gate.wait()
                    self.streamed += 1
                    time.sleep(0.001)
                    yield np.zeros(10, np.float32)
            finally:
                self.stream_closed.set()
        return chunks()


def run(coro):
    return asyncio.run(coro)


async def started(rt, warm_up: bool | None = None, **kwargs) -> Scheduler:
    """A started scheduler; warmed up (which measures the curve) only for max_batch auto by default."""
    scheduler = Scheduler(rt, **kwargs)
    await scheduler.start(warm_up=kwargs.get("max_batch") == "auto" if warm_up is None else warm_up)
    return scheduler


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_gathers_compatible_requests_up_to_max_batch():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt, max_batch=4, max_wait_ms=20, queue_size=16)
        rt.gate.clear()  # the first request holds the worker while the rest queue up
        first = asyncio.create_task(scheduler.synthesize("aaaa"))
        await _until(lambda: scheduler.running == 1)
        same = [asyncio.create_task(scheduler.synthesize(f"b{i}xx")) for i in range(5)]
        faster = asyncio.create_task(scheduler.synthesize("cccc", speed=2.0))
        longer = asyncio.create_task(scheduler.synthesize("d" * 40))
        await _until(lambda: scheduler.depth == 7)
        rt.gate.set()
        results = await asyncio.gather(first, *same, faster, longer)
        await scheduler.close()
        return rt.calls, results

    calls, results = run(main())
    assert calls[0] == ["aaaa"]
    assert calls[1] == ["b0xx", "b1xx", "b2xx", "b3xx"]  # max_batch, arrival order
    assert sorted(map(tuple, calls[2:])) == [("b4xx",), ("cccc",), ("d" * 40,)]  # other settings / lengths
    assert [r.batch_size for r in results[1:5]] == [4, 4, 4, 4]
    assert all(len(r.audio) == len(t) for r, t in zip(results, ["aaaa", *[f"b{i}xx" for i in range(5)]]))


def test_queue_full_then_accepts_again():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt, queue_size=2)
        rt.gate.clear()
        running = asyncio.create_task(scheduler.synthesize("one"))
        await _until(lambda: scheduler.running == 1)
        queued = [asyncio.create_task(scheduler.synthesize(t)) for t in ("two", "three")]
        await _until(lambda: scheduler.depth == 2)
        with pytest.raises(QueueFullError) as full:
            await scheduler.synthesize("four")
        assert full.value.retry_after >= 1
        rt.gate.set()
        await asyncio.gather(running, *queued)
        assert (await scheduler.synthesize("five")).audio.size == 4
        await scheduler.close()
        with pytest.raises(SchedulerClosedError):
            await scheduler.synthesize("six")

    run(main())


def test_cancelled_and_timed_out_requests_never_reach_the_model():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt, queue_size=8, request_timeout_s=0.3)
        rt.gate.clear()
        running = asyncio.create_task(scheduler.synthesize("held"))
        await _until(lambda: scheduler.running == 1)
        leaving = asyncio.create_task(scheduler.synthesize("leaves"))
        waiting = asyncio.create_task(scheduler.synthesize("waits"))
        await _until(lambda: scheduler.depth == 2)
        leaving.cancel()  # the client disconnected
        with pytest.raises(TimeoutError):
            await waiting  # the worker is held past the deadline
        rt.gate.set()
        with pytest.raises(TimeoutError):
            await running  # the result came too late for its caller too
        await scheduler.close()
        return rt.calls

    assert run(main()) == [["held"]]


def test_failing_request_in_a_batch_fails_alone():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt, max_batch=3, max_wait_ms=50, queue_size=8)
        rt.gate.clear()
        blocker = asyncio.create_task(scheduler.synthesize("wait"))
        await _until(lambda: scheduler.running == 1)
        tasks = [asyncio.create_task(scheduler.synthesize(t)) for t in ("good", "bad", "fine")]
        await _until(lambda: scheduler.depth == 3)
        rt.gate.set()
        outcomes = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await scheduler.close()
        return outcomes

    _, good, bad, fine = run(main())
    assert isinstance(bad, InvalidInputError)
    assert good.audio.size == 4 and fine.audio.size == 4


def test_stream_delivers_chunks_and_stops_the_worker_when_closed():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt)
        stream = scheduler.stream("long text")
        got = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # the client went away
        await asyncio.get_running_loop().run_in_executor(None, rt.stream_closed.wait, 30)
        after = await scheduler.synthesize("next")  # the worker is free again
        await scheduler.close()
        return got, rt.streamed, after

    got, produced, after = run(main())
    assert len(got) == 3 and all(c.size == 10 for c in got)
    assert produced < 1000  # stopped early, not run to the end
    assert after.audio.size == 4


def test_choose_batch_size_prefers_smaller_within_tolerance():
    assert choose_batch_size({1: 3.85, 2: 3.78, 4: 3.02}) == 1  # measured on 2 CPU cores
    assert choose_batch_size({1: 1.0, 2: 1.9, 4: 3.5, 8: 3.6}) == 4  # 3.5 is within 5% of 3.6
    assert choose_batch_size({1: 1.0, 2: 1.9, 4: 3.0, 8: 3.6}) == 8


def test_auto_measures_the_curve_and_uses_the_best():
    rt = FakeRuntime(batch_cost={1: 0.02, 2: 0.02, 4: 0.4, 8: 0.8})  # batch 2 doubles throughput

    async def main():
        scheduler = await started(rt, max_batch="auto")
        await scheduler.close()
        return scheduler

    scheduler = run(main())
    assert scheduler.max_batch == 2
    assert set(scheduler.batch_curve) == {1, 2, 4}  # 4 gained nothing: 8 never tried
    slow = measure_batch_curve(FakeRuntime(batch_cost={1: 0.01, 2: 0.1}), sizes=(1, 2, 4), repeats=1)
    assert choose_batch_size(slow) == 1 and list(slow) == [1, 2]


class PerCharacterRuntime(FakeRuntime):
    """Every request costs `per_char` seconds per character; a batch of n costs `batch_factor[n]`
    times one request (an autoregressive model: the batch shares each step)."""

    def __init__(self, per_char: float, batch_factor: dict[int, float]) -> None:
        super().__init__()
        self.per_char, self.batch_factor = per_char, batch_factor

    def synthesize(self, text, voice=None, **settings):
        self.calls.append([text])
        time.sleep(self.per_char * len(text))
        return np.zeros(len(text), np.float32), self.sample_rate

    def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
        self.calls.append(list(texts))
        time.sleep(self.per_char * max(map(len, texts)) * self.batch_factor[len(texts)])
        return [(np.zeros(len(t), np.float32), self.sample_rate) for t in texts]


def test_startup_measurement_of_a_slow_model_uses_a_short_text_and_keeps_its_budget():
    from edge_runtime.serving.batch_tuner import CALIBRATION_TEXT, SHORT_CALIBRATION_TEXT

    per_char = 0.002  # the calibration sentence takes 0.15 s: the whole curve would not fit 1 s
    rt = PerCharacterRuntime(per_char, {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})  # batching is free
    start = time.perf_counter()
    curve = measure_batch_curve(rt, budget_s=1.0)
    elapsed = time.perf_counter() - start
    texts = {text for call in rt.calls for text in call}
    assert texts == {SHORT_CALIBRATION_TEXT, CALIBRATION_TEXT}  # the long one timed once, then dropped
    assert sum(CALIBRATION_TEXT in call for call in rt.calls) == 1
    # requests/s in calibration-length requests, as the online curve counts them
    alone = 1 / (per_char * len(CALIBRATION_TEXT))
    assert curve[1] == pytest.approx(alone, rel=0.3)
    assert curve[2] == pytest.approx(2 * alone, rel=0.3)
    assert elapsed < 1.0 + 16 * per_char * len(SHORT_CALIBRATION_TEXT) * 2  # at most one batch past the budget
    assert choose_batch_size(curve) == max(curve)


def test_startup_measurement_stops_at_its_budget_and_leaves_the_rest_online():
    rt = PerCharacterRuntime(0.002, {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})  # every size gains: 16 would win
    start = time.perf_counter()
    curve = measure_batch_curve(rt, budget_s=0.5)  # ~0.05 s per run even on the short text
    elapsed = time.perf_counter() - start
    assert 1 in curve and 16 not in curve  # the budget ran out before the end of the curve
    assert max(len(call) for call in rt.calls) < 16
    assert elapsed < 0.5 + 0.5  # the sizes started before the budget ran out, no more
    assert all(b > a for a, b in zip(curve.values(), list(curve.values())[1:]))


async def closed_loop(scheduler: Scheduler, clients: int, each: int, text: str = "abcd") -> list:
    """`clients` callers, each sending its next request 1-5 ms after the previous answer came back
    (an HTTP client's round trip: they come back one by one, not all in one event-loop turn)."""
    async def client(index: int) -> list:
        results = []
        for _ in range(each):
            results.append(await scheduler.synthesize(text))
            await asyncio.sleep(0.001 + 0.004 * index / clients)
        return results

    results = await asyncio.gather(*(client(i) for i in range(clients)))
    return [r for per_client in results for r in per_client]


def test_lone_request_does_not_wait_for_companions():
    async def main():
        rt = FakeRuntime()
        scheduler = await started(rt, max_batch=4, max_wait_ms=2000)
        start = time.monotonic()
        await scheduler.synthesize("alone")  # nobody else was in the system recently: no wait
        took = time.monotonic() - start
        await scheduler.close()
        return took

    assert run(main()) < 1.0


def test_closed_loop_clients_fill_batches_without_a_configured_wait():
    """max_wait_ms 0 with max_batch 8: the scheduler still waits (a tenth of a batch's time) for the
    clients whose answers just went out, instead of alternating batches of 1 and 7."""
    async def main():
        rt = FakeRuntime(batch_cost={n: 0.1 for n in range(1, 9)})
        scheduler = await started(rt, max_batch=8, max_wait_ms=0, queue_size=16)
        await closed_loop(scheduler, clients=8, each=8)
        await scheduler.close()
        return [len(call) for call in rt.calls]

    sizes = run(main())
    assert sum(sizes) == 64
    assert sum(size == 8 for size in sizes) >= len(sizes) - 3, sizes  # a ramp-up, then full batches


def per_request_cost(costs: dict[int, float]) -> dict[int, float]:
    """Batch size -> seconds for the whole batch, from seconds per request at some sizes (others
    take the nearest smaller size's)."""
    out, last = {}, None
    for size in range(1, 17):
        last = costs.get(size, last)
        out[size] = last * size
    return out


@pytest.mark.parametrize("startup_curve, costs, chosen, refined", [
    # start-up measured batching as useless (noise, or another text); serving shows batch 4 is best
    ({1: 10.0, 2: 5.0}, {1: 0.02, 2: 0.01, 4: 0.006, 8: 0.012}, 1, 4),
    # start-up measured batch 4 as best; serving shows every batch costs more per request than one alone
    ({1: 1.0, 2: 2.0, 4: 4.0, 8: 2.0}, {1: 0.004, 2: 0.008, 4: 0.012}, 4, 1),
])
def test_auto_refines_the_choice_online(monkeypatch, startup_curve, costs, chosen, refined):
    import edge_runtime.serving.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "measure_batch_curve", lambda runtime, sizes: dict(startup_curve))
    monkeypatch.setattr(scheduler_module, "PROBE_EVERY", 2)  # probe often: a short test
    rt = FakeRuntime(batch_cost=per_request_cost(costs))
    seen = []

    async def main():
        scheduler = await started(rt, max_batch="auto", max_wait_ms=0, queue_size=16)
        seen.append(scheduler.max_batch)
        for _ in range(6):
            await closed_loop(scheduler, clients=8, each=12)
            seen.append(scheduler.max_batch)
        await scheduler.close()
        return scheduler

    scheduler = run(main())
    assert seen[0] == chosen
    assert scheduler.max_batch == refined, (seen, scheduler.online_curve)
    assert scheduler.batch_curve == startup_curve  # the start-up curve stays what was measured
    # the online curve ranks the sizes as the real costs do
    measured = {s: r for s, r in scheduler.online_curve.items() if scheduler.online_samples[s] >= 3}
    assert max(measured, key=measured.get) == refined


def test_auto_without_warm_up_starts_at_one_and_learns_while_serving(monkeypatch):
    import edge_runtime.serving.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "PROBE_EVERY", 2)
    rt = FakeRuntime(batch_cost=per_request_cost({1: 0.02, 2: 0.01, 4: 0.006}))

    async def main():
        scheduler = await started(rt, max_batch="auto", max_wait_ms=0, queue_size=16, warm_up=False)
        assert scheduler.max_batch == 1 and scheduler.batch_curve == {} and rt.calls == []  # nothing ran
        for _ in range(4):
            await closed_loop(scheduler, clients=8, each=12)
        await scheduler.close()
        return scheduler

    scheduler = run(main())
    assert scheduler.max_batch >= 2, scheduler.online_curve  # batching pays here, and it found out


def test_auto_does_not_move_on_noise(monkeypatch):
    """Every size costs the same per request, each batch +-20% at random (a shared VM): the
    choice stays where start-up put it."""
    import random

    import edge_runtime.serving.scheduler as scheduler_module

    class Noisy(FakeRuntime):
        def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
            time.sleep(0.004 * len(texts) * rng.uniform(0.8, 1.2))
            return super().synthesize_batch(texts, voice, max_batch, **settings)

        def synthesize(self, text, voice=None, **settings):
            time.sleep(0.004 * rng.uniform(0.8, 1.2))
            return super().synthesize(text, voice, **settings)

    rng = random.Random(0)
    monkeypatch.setattr(scheduler_module, "measure_batch_curve", lambda runtime, sizes: {1: 1.0, 2: 1.5, 4: 2.0, 8: 1.0})
    monkeypatch.setattr(scheduler_module, "PROBE_EVERY", 2)

    async def main():
        scheduler = await started(Noisy(), max_batch="auto", max_wait_ms=0, queue_size=16)
        for _ in range(5):
            await closed_loop(scheduler, clients=8, each=12)
        await scheduler.close()
        return scheduler

    scheduler = run(main())
    assert scheduler.max_batch == 4
    assert sum(map(len, scheduler._ratios.values())) >= 8  # neighbours were compared, not ignored
