"""The batch tuner on simulated time: the sizes it may choose, online refinement fed with
synthetic batch times, and the plan's VRAM bound, at start-up and while serving, down to a real
Runtime loaded under a small GPU-tier plan."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from serving_fakes import FakeClock, closed_loop, run_on, started
from transformers import LlamaConfig, LlamaForCausalLM

from edge_runtime.models.base import SpeechModel
from edge_runtime.policy.planner import CostModel, compute_budget, layout_from_config, plan
from edge_runtime.policy.planner.layout import GIB
from edge_runtime.policy.profiles import load_profile
from edge_runtime.serving.batch_tuner import (BATCH_SIZES, CALIBRATION_TEXT, BatchTuner, candidate_sizes,
                                              measure_batch_curve)

BOUND = 3  # the small tier below holds at most 3 requests per batch


def cost(size: int) -> float:
    """Seconds per batch where every doubling pays: auto would grow to 16 if nothing bounded it."""
    return 0.005 * (1 + size)


def serve_synthetic(tuner: BatchTuner, batches: int, load: int = 16) -> list[int]:
    """Run `batches` batches of calibration-length requests at the sizes the tuner asks for, with
    `load` requests always waiting; returns the sizes run."""
    ran = []
    for _ in range(batches):
        size = tuner.next_size()
        run = min(size, load)
        tuner.observe(run, run * len(CALIBRATION_TEXT), cost(run), full=run >= size)
        ran.append(run)
    return ran


def test_candidate_sizes_follow_the_queue_and_the_plan_bound():
    assert candidate_sizes(33, None) == BATCH_SIZES
    assert candidate_sizes(3, None) == (1, 2)  # a queue of 2 plus the head
    assert candidate_sizes(33, 3) == (1, 2, 3)  # the bound itself fits; 4 does not
    assert candidate_sizes(33, 8) == (1, 2, 4, 8)
    assert candidate_sizes(33, 1) == (1,)
    assert candidate_sizes(33, 100) == BATCH_SIZES
    assert candidate_sizes(5, 4) == (1, 2, 4)


def test_online_refinement_climbs_to_the_best_size():
    tuner = BatchTuner("auto", probe_every=2, clock=FakeClock())
    serve_synthetic(tuner, 400)
    assert tuner.current == 16 and tuner.startup_curve == {}


def test_auto_never_exceeds_the_plan_bound():
    clock = FakeClock()
    calls: list[int] = []

    def forward(texts):
        calls.append(len(texts))
        clock.advance(cost(len(texts)))

    tuner = BatchTuner("auto", bound=BOUND, probe_every=2, clock=clock)
    tuner.calibrate(forward)  # the real start-up measurement, on simulated time
    assert set(tuner.startup_curve) == {1, 2, 3} and max(calls) == BOUND
    assert tuner.current == BOUND
    ran = serve_synthetic(tuner, 400)
    assert max(ran) <= BOUND and BOUND - 1 in ran  # probed downwards only
    assert tuner.current == BOUND and set(tuner.online_curve) <= {1, 2, 3}


def test_auto_under_the_bound_moves_but_stays_below_it():
    # start-up (injected) put it at 1; serving finds bigger is better, up to the bound and no further
    tuner = BatchTuner("auto", bound=BOUND, probe_every=2, clock=FakeClock(),
                       measure=lambda run, sizes: {1: 10.0, 2: 5.0, 4: 1.0})
    tuner.calibrate(lambda texts: None)
    assert tuner.current == 1
    ran = serve_synthetic(tuner, 400)
    assert max(ran) <= BOUND and tuner.current == BOUND


def test_fixed_max_batch_above_the_bound_is_kept_with_a_warning():
    tuner = BatchTuner(8, bound=BOUND)
    assert tuner.next_size() == 8  # the user's explicit choice
    assert "above the plan's bound of 3" in tuner.warning()
    assert "plan bound: at most 3 requests per batch" in tuner.describe()
    assert BatchTuner(2, bound=BOUND).warning() is None
    assert BatchTuner("auto", bound=BOUND).warning() is None
    assert "plan bound" not in BatchTuner("auto").describe()


def test_measure_batch_curve_runs_on_the_injected_clock():
    clock = FakeClock()

    def forward(texts):
        clock.advance(0.01 if len(texts) == 1 else 0.1)

    curve = measure_batch_curve(forward, sizes=(1, 2, 4), repeats=1, clock=clock)
    assert curve == {1: pytest.approx(100.0), 2: pytest.approx(20.0)}


# --- a real Runtime loaded under a small GPU-tier plan --------------------------------------------

def small_tier_plan():
    """A tiny Llama on a GPU tier that holds its weights and 3.5 requests' activations and KV cache."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)
    layout = layout_from_config(config, LlamaForCausalLM, dtype=torch.float16)
    one = compute_budget(load_profile("cpu", ("memory.vram_gib=1",)), layout)
    vram = (layout.total_bytes + 3.5 * (one.activation_bytes + one.kv_cache_bytes)) / GIB
    profile = load_profile("cpu", (f"memory.vram_gib={vram:.12f}", "runtime.threads=1"))
    return profile, plan(layout, profile, compute_budget(profile, layout), CostModel())


class CostedModel(SpeechModel):
    """A loaded model whose batches cost `cost(n)` simulated seconds and record their sizes."""

    family = "test-costed"
    model_id = "test:costed"
    sample_rate = 100
    supports_batch = True

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sizes: list[int] = []

    @classmethod
    def layout(cls, source, dtype, fp32_components=()):
        raise NotImplementedError

    @classmethod
    def load(cls, source, placer):
        raise NotImplementedError

    def components(self):
        return {}

    def split_text(self, text):
        return [text]

    def synthesize_unit(self, unit, settings, voice=None, stream=False):
        self.sizes.append(1)
        self.clock.advance(cost(1))
        yield np.zeros(len(unit), np.float32)

    def synthesize_batch(self, units, settings, voice=None):
        self.sizes.append(len(units))
        self.clock.advance(cost(len(units)))
        return [np.zeros(len(unit), np.float32) for unit in units]


@pytest.fixture(scope="module")
def bounded_runtime():
    from edge_runtime.runtime.engine import Runtime

    profile, small = small_tier_plan()
    assert small.max_batch == BOUND and not small.cpu_only
    runtime = Runtime(CostedModel(FakeClock()), profile, plan=small)
    runtime.clock = runtime.model.clock  # the serving fakes time everything on this clock
    return runtime


def test_a_runtime_plan_bounds_auto_at_start_up_and_while_serving(bounded_runtime):
    rt = bounded_runtime
    rt.model.sizes.clear()
    chosen = []

    async def main():
        stack = await started(rt, "auto", max_wait_ms=0, queue_size=16, probe_every=2)
        assert stack.tuner.bound == BOUND
        chosen.append(stack.tuner.current)
        for _ in range(4):
            await closed_loop(stack.scheduler, clients=8, each=12)
            chosen.append(stack.tuner.current)
        await stack.close()
        return stack.tuner

    tuner = run(main())
    assert set(tuner.startup_curve) == {1, 2, 3}  # unbounded, this model's curve runs to 16
    assert max(rt.model.sizes) <= BOUND and chosen == [BOUND] * 5
    assert tuner.online_samples.get(BOUND - 1, 0) >= 1  # it did probe, downwards only
    unbounded = measure_batch_curve(run_on(rt), clock=rt.clock)
    assert max(unbounded) == 16  # control: the same model, with nothing bounding it


def test_serve_start_up_prints_the_bound_and_warns_about_a_fixed_size_above_it(bounded_runtime):
    pytest.importorskip("fastapi")
    from edge_runtime.serving.server import ServerSettings, create_app

    lines: list[str] = []

    async def start_and_stop(max_batch):
        app = create_app(bounded_runtime, ServerSettings(max_batch=max_batch, warm_up=False, api_key="",
                                                         announce=lines.append))
        async with app.router.lifespan_context(app):
            pass

    run(start_and_stop("auto"))
    assert lines == ["batching: max_batch auto -> 1 (not measured at start-up: no warm-up; learned while "
                     "serving); plan bound: at most 3 requests per batch fit the budget"]
    lines.clear()
    run(start_and_stop(8))
    assert lines[0] == "batching: max_batch 8; plan bound: at most 3 requests per batch fit the budget"
    assert lines[1].startswith("warning: batching: max_batch 8 is above the plan's bound of 3")


def run(coro):
    return asyncio.run(coro)
