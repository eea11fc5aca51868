"""The micro-batching scheduler and the worker with a fake runtime (no model) on a simulated clock:
what it gathers, what it refuses, cancellation, timeouts, streams, and how `max_batch: auto`
chooses and refines through the whole stack. No test sleeps or bounds wall-clock time: waits are
on events, the model's costs are simulated seconds."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from serving_fakes import (FakeClock, FakeRuntime, closed_loop, per_request_cost, run_on, started, until,
                           until_set)

from edge_runtime.errors import InvalidInputError
from edge_runtime.serving.batch_tuner import (CALIBRATION_TEXT, SHORT_CALIBRATION_TEXT, BatchTuner,
                                              choose_batch_size, measure_batch_curve)
from edge_runtime.serving.scheduler import QueueFullError, Scheduler, SchedulerClosedError


def run(coro):
    return asyncio.run(coro)


async def hold_worker(stack, rt, text: str) -> asyncio.Task:
    """Start a request that holds the worker (rt.gate cleared) and wait until the model has it."""
    rt.gate.clear()
    rt.entered.clear()
    task = asyncio.create_task(stack.scheduler.synthesize(text))
    await until_set(rt.entered)
    return task


def test_gathers_compatible_requests_up_to_max_batch():
    async def main():
        rt = FakeRuntime()
        stack = await started(rt, max_batch=4, max_wait_ms=20, queue_size=16)
        scheduler = stack.scheduler
        first = await hold_worker(stack, rt, "aaaa")  # holds the worker while the rest queue up
        same = [asyncio.create_task(scheduler.synthesize(f"b{i}xx")) for i in range(5)]
        faster = asyncio.create_task(scheduler.synthesize("cccc", speed=2.0))
        longer = asyncio.create_task(scheduler.synthesize("d" * 40))
        await until(lambda: scheduler.depth == 7)
        rt.gate.set()
        results = await asyncio.gather(first, *same, faster, longer)
        await stack.close()
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
        stack = await started(rt, queue_size=2)
        scheduler = stack.scheduler
        running = await hold_worker(stack, rt, "one")
        assert scheduler.running == 1
        queued = [asyncio.create_task(scheduler.synthesize(t)) for t in ("two", "three")]
        await until(lambda: scheduler.depth == 2)
        with pytest.raises(QueueFullError) as full:
            await scheduler.synthesize("four")
        assert full.value.retry_after >= 1
        rt.gate.set()
        await asyncio.gather(running, *queued)
        assert (await scheduler.synthesize("five")).audio.size == 4
        await stack.close()
        with pytest.raises(SchedulerClosedError):
            await scheduler.synthesize("six")

    run(main())


def test_cancelled_and_timed_out_requests_never_reach_the_model():
    async def main():
        rt = FakeRuntime()
        stack = await started(rt, queue_size=8, request_timeout_s=0.3)
        scheduler = stack.scheduler
        running = await hold_worker(stack, rt, "held")
        leaving = asyncio.create_task(scheduler.synthesize("leaves"))
        waiting = asyncio.create_task(scheduler.synthesize("waits"))
        await until(lambda: scheduler.depth == 2)
        leaving.cancel()  # the client disconnected
        with pytest.raises(TimeoutError):
            await waiting  # the worker is held past the deadline
        rt.gate.set()
        with pytest.raises(TimeoutError):
            await running  # the result came too late for its caller too
        await stack.close()
        return rt.calls

    assert run(main()) == [["held"]]


def test_failing_request_in_a_batch_fails_alone():
    async def main():
        rt = FakeRuntime()
        stack = await started(rt, max_batch=3, max_wait_ms=50, queue_size=8)
        blocker = await hold_worker(stack, rt, "wait")
        tasks = [asyncio.create_task(stack.scheduler.synthesize(t)) for t in ("good", "bad", "fine")]
        await until(lambda: stack.scheduler.depth == 3)
        rt.gate.set()
        outcomes = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await stack.close()
        return outcomes

    _, good, bad, fine = run(main())
    assert isinstance(bad, InvalidInputError)
    assert good.audio.size == 4 and fine.audio.size == 4


def test_stream_delivers_chunks_and_stops_the_worker_when_closed():
    async def main():
        rt = FakeRuntime()
        stack = await started(rt)
        stream = stack.scheduler.stream("long text")
        got = [await stream.__anext__() for _ in range(3)]
        await until_set(rt.stream_paused)  # the model holds its 4th chunk ...
        await stream.aclose()  # ... while the client goes away
        rt.stream_resume.set()
        await until_set(rt.stream_closed)
        after = await stack.scheduler.synthesize("next")  # the worker is free again
        await stack.close()
        return got, rt.streamed, after

    got, produced, after = run(main())
    assert len(got) == 3 and all(c.size == 10 for c in got)
    assert produced < 1000  # stopped early, not run to the end
    assert after.audio.size == 4


def test_lone_request_does_not_wait_for_companions():
    """max_wait_ms 2 s: a request with nobody else recently in the system is handed over at once;
    one whose compatible companion is on the worker waits for the next one (scheduler alone: the
    test takes the batches)."""
    async def main():
        clock = FakeClock()
        scheduler = Scheduler(BatchTuner(4, clock=clock), max_wait_ms=2000, clock=clock)
        alone = asyncio.create_task(scheduler.synthesize("alone"))
        await until(lambda: scheduler.depth == 1)
        taking = asyncio.create_task(scheduler.next_batch())
        for _ in range(3):
            await asyncio.sleep(0)  # a few loop turns, no time
        assert taking.done(), "a lone request waited for companions"
        lone = taking.result()
        assert [job.text for job in lone.jobs] == ["alone"] and scheduler.running == 1

        # "alone" is still on the worker: the next compatible request expects a companion
        second = asyncio.create_task(scheduler.synthesize("bbbb1"))
        await until(lambda: scheduler.depth == 1)
        scheduler.done(lone, 0.1, measured=True)
        taking = asyncio.create_task(scheduler.next_batch())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not taking.done()  # waiting: two were in the system at once a moment ago
        third = asyncio.create_task(scheduler.synthesize("bbbb2"))
        pair = await taking
        assert [job.text for job in pair.jobs] == ["bbbb1", "bbbb2"] and not pair.full
        scheduler.done(pair, 0.1, measured=True)
        for task in (alone, second, third):
            task.cancel()
        await scheduler.close()

    run(main())


def test_closed_loop_clients_fill_batches_without_a_configured_wait():
    """max_wait_ms 0 with max_batch 8: the scheduler still waits (a tenth of a batch's time) for the
    clients whose answers just went out, instead of alternating batches of 1 and 7."""
    async def main():
        rt = FakeRuntime(batch_cost={n: 0.1 for n in range(1, 9)})
        stack = await started(rt, max_batch=8, max_wait_ms=0, queue_size=16)
        await closed_loop(stack.scheduler, clients=8, each=8)
        await stack.close()
        return [len(call) for call in rt.calls]

    sizes = run(main())
    assert sum(sizes) == 64
    assert sum(size == 8 for size in sizes) >= len(sizes) - 3, sizes  # a ramp-up, then full batches


# --- max_batch auto through the whole stack -----------------------------------------------------

def test_choose_batch_size_prefers_smaller_within_tolerance():
    assert choose_batch_size({1: 3.85, 2: 3.78, 4: 3.02}) == 1  # measured on 2 CPU cores
    assert choose_batch_size({1: 1.0, 2: 1.9, 4: 3.5, 8: 3.6}) == 4  # 3.5 is within 5% of 3.6
    assert choose_batch_size({1: 1.0, 2: 1.9, 4: 3.0, 8: 3.6}) == 8


def test_auto_measures_the_curve_and_uses_the_best():
    rt = FakeRuntime(batch_cost={1: 0.02, 2: 0.02, 4: 0.4, 8: 0.8})  # batch 2 doubles throughput

    async def main():
        stack = await started(rt, max_batch="auto")
        await stack.close()
        return stack

    stack = run(main())
    assert stack.scheduler.max_batch == stack.tuner.current == 2
    assert set(stack.tuner.startup_curve) == {1, 2, 4}  # 4 gained nothing: 8 never tried
    slow_rt = FakeRuntime(batch_cost={1: 0.01, 2: 0.1})
    slow = measure_batch_curve(run_on(slow_rt), sizes=(1, 2, 4), repeats=1, clock=slow_rt.clock)
    assert choose_batch_size(slow) == 1 and list(slow) == [1, 2]


class PerCharacterRuntime(FakeRuntime):
    """Every request costs `per_char` simulated seconds per character; a batch of n costs
    `batch_factor[n]` times one request (an autoregressive model: the batch shares each step)."""

    def __init__(self, per_char: float, batch_factor: dict[int, float]) -> None:
        super().__init__()
        self.per_char, self.batch_factor = per_char, batch_factor

    def synthesize(self, text, voice=None, **settings):
        self.calls.append([text])
        self.clock.advance(self.per_char * len(text))
        return np.zeros(len(text), np.float32), self.sample_rate

    def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
        self.calls.append(list(texts))
        self.clock.advance(self.per_char * max(map(len, texts)) * self.batch_factor[len(texts)])
        return [(np.zeros(len(t), np.float32), self.sample_rate) for t in texts]


def test_startup_measurement_of_a_slow_model_uses_a_short_text_and_keeps_its_budget():
    per_char = 0.002  # the calibration sentence takes 0.15 s: the whole curve would not fit 1 s
    rt = PerCharacterRuntime(per_char, {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})  # batching is free
    start = rt.clock()
    curve = measure_batch_curve(run_on(rt), budget_s=1.0, clock=rt.clock)
    elapsed = rt.clock() - start
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
    start = rt.clock()
    curve = measure_batch_curve(run_on(rt), budget_s=0.5, clock=rt.clock)  # ~0.05 s per run even on the short text
    elapsed = rt.clock() - start
    assert 1 in curve and 16 not in curve  # the budget ran out before the end of the curve
    assert max(len(call) for call in rt.calls) < 16
    assert elapsed < 0.5 + 0.5  # the sizes started before the budget ran out, no more
    assert all(b > a for a, b in zip(curve.values(), list(curve.values())[1:]))


@pytest.mark.parametrize("startup_curve, costs, chosen, refined", [
    # start-up measured batching as useless (noise, or another text); serving shows batch 4 is best
    ({1: 10.0, 2: 5.0}, {1: 0.02, 2: 0.01, 4: 0.006, 8: 0.012}, 1, 4),
    # start-up measured batch 4 as best; serving shows every batch costs more per request than one alone
    ({1: 1.0, 2: 2.0, 4: 4.0, 8: 2.0}, {1: 0.004, 2: 0.008, 4: 0.012}, 4, 1),
])
def test_auto_refines_the_choice_online(startup_curve, costs, chosen, refined):
    rt = FakeRuntime(batch_cost=per_request_cost(costs))
    seen = []

    async def main():
        stack = await started(rt, max_batch="auto", max_wait_ms=0, queue_size=16,
                              measure=lambda run, sizes: dict(startup_curve), probe_every=2)  # probe often
        seen.append(stack.scheduler.max_batch)
        for _ in range(6):
            await closed_loop(stack.scheduler, clients=8, each=12)
            seen.append(stack.scheduler.max_batch)
        await stack.close()
        return stack.tuner

    tuner = run(main())
    assert seen[0] == chosen
    assert tuner.current == refined, (seen, tuner.online_curve)
    assert tuner.startup_curve == startup_curve  # the start-up curve stays what was measured
    # the online curve ranks the sizes as the real costs do
    measured = {s: r for s, r in tuner.online_curve.items() if tuner.online_samples[s] >= 3}
    assert max(measured, key=measured.get) == refined


def test_auto_without_warm_up_starts_at_one_and_learns_while_serving():
    rt = FakeRuntime(batch_cost=per_request_cost({1: 0.02, 2: 0.01, 4: 0.006}))

    async def main():
        stack = await started(rt, max_batch="auto", max_wait_ms=0, queue_size=16, warm_up=False, probe_every=2)
        assert stack.tuner.current == 1 and stack.tuner.startup_curve == {} and rt.calls == []  # nothing ran
        for _ in range(4):
            await closed_loop(stack.scheduler, clients=8, each=12)
        await stack.close()
        return stack.tuner

    tuner = run(main())
    assert tuner.current >= 2, tuner.online_curve  # batching pays here, and it found out


def test_auto_does_not_move_on_noise():
    """Every size costs the same per request, each batch +-20% at random (a shared VM): the
    choice stays where start-up put it."""
    rng = random.Random(0)

    class Noisy(FakeRuntime):
        def synthesize_batch(self, texts, voice=None, max_batch=None, **settings):
            self.clock.advance(0.004 * len(texts) * rng.uniform(0.8, 1.2))
            return super().synthesize_batch(texts, voice, max_batch, **settings)

        def synthesize(self, text, voice=None, **settings):
            self.clock.advance(0.004 * rng.uniform(0.8, 1.2))
            return super().synthesize(text, voice, **settings)

    async def main():
        stack = await started(Noisy(), max_batch="auto", max_wait_ms=0, queue_size=16,
                              measure=lambda run, sizes: {1: 1.0, 2: 1.5, 4: 2.0, 8: 1.0}, probe_every=2)
        for _ in range(5):
            await closed_loop(stack.scheduler, clients=8, each=12)
        await stack.close()
        return stack.tuner

    tuner = run(main())
    assert tuner.current == 4
    assert sum(map(len, tuner.ratios.values())) >= 8  # neighbours were compared, not ignored
