"""Memory governor: cleanup policies, snapshots, OOM classification and fault injection."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from edge_runtime.policy.schema import Cleanup
from edge_runtime.runtime import memory
from edge_runtime.runtime.memory import MemoryGovernor, MemorySnapshot, OOMInjector, is_oom_error

MiB = 1024 * 1024


def governor(policy: str, *, every_n: int = 8, fragmentation_threshold: float = 0.25, malloc_trim: bool = True,
             **kwargs) -> MemoryGovernor:
    """A governor from a schema-validated cleanup section, as the engine builds it. Tests that inject
    `stats` check decisions, not cleaning: those collect only the youngest generation (a full
    collection walks pytest's whole heap, 0.2-0.5 s a call on a small machine)."""
    if "stats" in kwargs:
        kwargs.setdefault("gc_generation", 0)
    cleanup = Cleanup(policy=policy, every_n=every_n, fragmentation_threshold=fragmentation_threshold,
                      malloc_trim=malloc_trim)
    return MemoryGovernor(cleanup, **kwargs)


class FakeStats:
    """Injectable snapshot source: the test sets the numbers the governor sees."""

    def __init__(self, **fields):
        self.fields = {"rss_bytes": 100 * MiB, **fields}
        self.calls = 0

    def set(self, **fields):
        self.fields.update(fields)

    def __call__(self) -> MemorySnapshot:
        self.calls += 1
        return MemorySnapshot(**self.fields)


def run(governor: MemoryGovernor, n: int) -> list[bool]:
    return [governor.after_request().cleaned for _ in range(n)]


# -- policies ---------------------------------------------------------------------------------
def test_per_request_cleans_every_call():
    gov = governor("per_request", stats=FakeStats())
    assert run(gov, 5) == [True] * 5
    assert gov.cleanups == 5 and gov.requests == 5 and gov.last_reason == "per_request"


def test_off_never_cleans_and_takes_no_snapshot():
    stats = FakeStats()
    gov = governor("off", stats=stats)
    records = [gov.after_request() for _ in range(20)]
    assert not any(r.cleaned for r in records)
    assert gov.cleanups == 0 and gov.last_reason is None and stats.calls == 0


@pytest.mark.parametrize("n", [1, 3, 8])
def test_every_n_cleans_on_each_nth_call(n):
    gov = governor("every_n", every_n=n, stats=FakeStats())
    cleaned = run(gov, 4 * n)
    assert [i + 1 for i, c in enumerate(cleaned) if c] == [n, 2 * n, 3 * n, 4 * n]
    assert gov.cleanups == 4


def test_every_n_count_restarts_after_a_forced_cleanup():
    gov = governor("every_n", every_n=4, stats=FakeStats())
    assert run(gov, 2) == [False, False]
    assert gov.recover_from_oom().cleaned
    assert run(gov, 4) == [False, False, False, True]
    assert gov.cleanups == 2 and gov.oom_recoveries == 1


def test_threshold_on_cuda_numbers_uses_fragmentation():
    stats = FakeStats(cuda_allocated=900 * MiB, cuda_reserved=1000 * MiB, cuda_peak=950 * MiB)  # 0.10
    gov = governor("threshold", fragmentation_threshold=0.25, stats=stats)
    assert run(gov, 3) == [False] * 3
    stats.set(cuda_allocated=700 * MiB)  # fragmentation 0.30 > 0.25
    record = gov.after_request()
    assert record.cleaned and record.reason.startswith("fragmentation 0.30")
    assert record.before.cuda_peak == 950 * MiB  # the request's peak survives the reset
    stats.set(cuda_allocated=750 * MiB)  # exactly 0.25 is not "over"
    assert run(gov, 1) == [False]
    stats.set(cuda_reserved=0, cuda_allocated=0)  # empty allocator: nothing to defragment
    assert run(gov, 1) == [False]
    assert gov.cleanups == 1


def test_threshold_on_cpu_uses_rss_growth_over_the_last_cleanup():
    stats = FakeStats(rss_bytes=1000 * MiB)
    gov = governor("threshold", fragmentation_threshold=0.25, stats=stats)
    assert run(gov, 1) == [False]  # first call sets the baseline (1000 MiB)
    stats.set(rss_bytes=1200 * MiB)  # +20%
    assert run(gov, 1) == [False]
    stats.set(rss_bytes=1300 * MiB)  # +30% -> clean; cleaning leaves 1300 MiB: the new baseline
    record = gov.after_request()
    assert record.cleaned and record.reason.startswith("rss growth 0.30")
    assert run(gov, 3) == [False] * 3  # a larger working set alone does not clean every request
    stats.set(rss_bytes=1700 * MiB)  # +30.8% over 1300
    assert run(gov, 1) == [True]
    assert gov.cleanups == 2


def test_bad_values_are_rejected_by_the_schema_not_the_governor():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="policy"):
        governor("sometimes")
    with pytest.raises(ValidationError, match="every_n"):
        governor("every_n", every_n=0)
    with pytest.raises(ValidationError, match="fragmentation_threshold"):
        governor("threshold", fragmentation_threshold=0)
    with pytest.raises(ValidationError, match="fragmentation_threshold"):
        governor("threshold", fragmentation_threshold=float("nan"))


def test_governor_takes_the_profile_cleanup_section_as_it_is():
    from edge_runtime.policy.profiles import load_profile

    profile = load_profile("cpu", ["cleanup.policy=every_n", "cleanup.every_n=2", "cleanup.malloc_trim=false",
                                   "cleanup.fragmentation_threshold=0.5"])
    gov = MemoryGovernor(profile.cleanup, stats=FakeStats(), gc_generation=0)
    assert (gov.policy, gov.every_n, gov.threshold, gov.malloc_trim) == ("every_n", 2, 0.5, False)
    assert run(gov, 4) == [False, True, False, True]


# -- what cleaning does -----------------------------------------------------------------------
def test_cleanup_collects_reference_cycles_holding_tensors():
    import gc
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    a.tensor = torch.zeros(1024)
    ref = weakref.ref(a.tensor)
    gc.disable()
    try:
        del a, b
        assert ref() is not None
        record = governor("per_request").after_request()
        assert record.cleaned and ref() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim is Linux-only")
def test_malloc_trim_runs_on_linux_when_enabled():
    if memory._malloc_trim is None:
        pytest.skip("libc without malloc_trim (musl)")
    assert governor("per_request", malloc_trim=True).after_request().trimmed
    assert not governor("per_request", malloc_trim=False).after_request().trimmed


def test_malloc_trim_missing_is_skipped_silently(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", None)
    record = governor("per_request", malloc_trim=True).after_request()
    assert record.cleaned and not record.trimmed


def test_malloc_trim_is_called_with_zero(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    gov = governor("every_n", every_n=2, malloc_trim=True, stats=FakeStats())
    run(gov, 4)
    assert calls == [0, 0]


def test_cleanup_record_and_counters():
    gov = governor("off", stats=FakeStats())
    record = gov.cleanup("manual")
    assert record.cleaned and record.reason == "manual" and record.seconds >= 0
    assert gov.stats()["cleanups"] == 1 and gov.stats()["last_reason"] == "manual"
    assert gov.stats()["cleanup_seconds"] == pytest.approx(record.seconds)


def test_freeze_baseline_round_trip():
    import gc

    try:
        assert MemoryGovernor.freeze_baseline() > 0
    finally:
        MemoryGovernor.release_baseline()
    assert gc.get_freeze_count() == 0


# -- snapshots --------------------------------------------------------------------------------
def test_snapshot_on_cpu_has_rss_and_no_cuda_fields():
    snap = governor("off", device="cpu").snapshot()
    assert snap.rss_bytes > 10 * MiB  # a Python process with torch loaded
    assert (snap.cuda_allocated, snap.cuda_reserved, snap.cuda_peak, snap.fragmentation) == (None,) * 4
    assert set(snap.as_dict()) == {"rss_bytes", "cuda_allocated", "cuda_reserved", "cuda_peak", "fragmentation"}


def test_snapshot_fragmentation_arithmetic():
    assert MemorySnapshot(1, cuda_allocated=3, cuda_reserved=4, cuda_peak=4).fragmentation == 0.25
    assert MemorySnapshot(1, cuda_allocated=0, cuda_reserved=0, cuda_peak=0).fragmentation == 0.0


@pytest.mark.gpu
def test_snapshot_on_cuda_reports_allocator_counters():
    gov = governor("per_request", device="cuda:0")
    x = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    snap = gov.snapshot()
    assert snap.cuda_allocated >= 64 * MiB and snap.cuda_reserved >= snap.cuda_allocated
    assert snap.cuda_peak >= 64 * MiB
    del x
    gov.after_request()
    assert gov.snapshot().cuda_reserved < 64 * MiB  # empty_cache gave the block back


# -- OOM classification -----------------------------------------------------------------------
@pytest.mark.parametrize("exc, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
    (ValueError("out of memory"), False),  # only allocator error types count
    (KeyError("x"), False),
    (OSError(12, "Cannot allocate memory"), False),
])
def test_is_oom_error_table(exc, expected):
    assert is_oom_error(exc) is expected


def test_real_cpu_allocation_failure_is_recognised():
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except Exception as exc:  # noqa: BLE001 - whatever the allocator raises must classify as OOM
        assert is_oom_error(exc), repr(exc)
    else:
        pytest.skip("the allocator granted 4 EiB")


# -- fault injection --------------------------------------------------------------------------
def test_injector_raises_on_exactly_the_nth_forward():
    layer = torch.nn.Linear(4, 2)
    x = torch.zeros(3, 4)
    with OOMInjector(layer, on_call=3) as inj:
        layer(x)
        layer(x)
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            layer(x)
        assert is_oom_error(info.value)
        for _ in range(5):
            layer(x)  # times=1: only once
    assert (inj.calls, inj.raised) == (8, 1)
    layer(x)  # removed on exit
    assert inj.calls == 8


def test_injector_times_limits_the_number_of_errors():
    layer = torch.nn.Linear(4, 2)
    outcomes = []
    with OOMInjector(layer, on_call=2, times=2):
        for _ in range(6):
            try:
                layer(torch.zeros(1, 4))
                outcomes.append("ok")
            except torch.cuda.OutOfMemoryError:
                outcomes.append("oom")
    assert outcomes == ["ok", "oom", "oom", "ok", "ok", "ok"]


def test_injector_only_for_batches_above_k_lets_split_and_retry_succeed():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    expected = layer(x)
    gov = governor("off", stats=FakeStats())
    attempts = []

    def forward_with_split(batch):
        attempts.append(len(batch))
        try:
            return layer(batch)
        except Exception as exc:
            if not is_oom_error(exc) or len(batch) == 1:
                raise
            gov.recover_from_oom()
            half = len(batch) // 2
            return torch.cat([forward_with_split(batch[:half]), forward_with_split(batch[half:])])

    with OOMInjector(layer, times=None, only_batch_above=2) as inj:
        out = forward_with_split(x)
    torch.testing.assert_close(out, expected)
    assert attempts == [8, 4, 2, 2, 4, 2, 2]
    assert inj.raised == 3 and gov.oom_recoveries == 3


def test_injector_reads_batch_from_keyword_arguments():
    class Net(torch.nn.Module):
        def forward(self, *, x):
            return x * 2

    net = Net()
    with OOMInjector(net, times=None, only_batch_above=1) as inj:
        net(x=torch.zeros(1, 3))
        with pytest.raises(torch.cuda.OutOfMemoryError, match="batch 2"):
            net(x=torch.zeros(2, 3))
    assert inj.raised == 1


def test_injector_install_remove_for_long_runs():
    layer = torch.nn.Linear(2, 2)
    inj = OOMInjector(layer, on_call=1).install()
    inj.install()  # idempotent: one hook
    with pytest.raises(torch.cuda.OutOfMemoryError):
        layer(torch.zeros(1, 2))
    inj.remove()
    inj.remove()
    layer(torch.zeros(1, 2))
    assert inj.calls == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_reuse_heap_sets_glibc_thresholds():
    from edge_runtime.runtime.memory import reuse_heap

    try:
        ctypes.CDLL(None).mallopt
    except AttributeError:
        pytest.skip("libc without mallopt (musl)")
    assert reuse_heap(1 << 30) is True
