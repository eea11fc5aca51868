"""Memory governor: when to clean up after a request, what cleaning does, and OOM helpers.

The governor decides *when* (the profile's `cleanup` policy) and performs the cleanup; it never
moves weights. `OOMInjector` fakes out-of-memory errors so the degrade path can be tested on CPU.

Measured on a 2-core CPU box (torch 2.13): a full `gc.collect()` walks the whole heap, ~170k objects
after `import torch`, 35-65 ms per call; young generations only take ~0.01 ms but miss cycles
that were promoted while still alive during a long request (the ones that pin tensors). So cleaning
does a full collect, and `freeze_baseline()` (call it once the model is loaded) moves the
long-lived heap into Python's permanent generation, which brings a full collect down to ~0.01 ms.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import torch

if TYPE_CHECKING:
    from edge_runtime.policy.schema import Cleanup

log = logging.getLogger(__name__)

# Substrings of RuntimeError messages that mean "an allocator ran out" (CUDA, ROCm, MPS, CPU; the
# cuBLAS / cuDNN ones are allocation failures inside those libraries).
_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory",
                "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


@dataclass(frozen=True)
class MemorySnapshot:
    """Process RSS and, on CUDA, the caching allocator's counters (None elsewhere)."""

    rss_bytes: int
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    cuda_peak: int | None = None

    @property
    def fragmentation(self) -> float | None:
        """Share of reserved CUDA memory not holding tensors: (reserved - allocated) / reserved."""
        if self.cuda_reserved is None or self.cuda_allocated is None:
            return None
        if self.cuda_reserved <= 0:
            return 0.0
        return max(0, self.cuda_reserved - self.cuda_allocated) / self.cuda_reserved

    def as_dict(self) -> dict[str, Any]:
        return {"rss_bytes": self.rss_bytes, "cuda_allocated": self.cuda_allocated,
                "cuda_reserved": self.cuda_reserved, "cuda_peak": self.cuda_peak,
                "fragmentation": self.fragmentation}


@dataclass(frozen=True)
class CleanupRecord:
    """What `after_request()` decided. `before` is the snapshot taken before cleaning: on CUDA its
    `cuda_peak` is the request's peak (cleaning resets the peak counter)."""

    cleaned: bool
    reason: str
    seconds: float = 0.0
    trimmed: bool = False  # malloc_trim ran
    before: MemorySnapshot | None = None


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where it does not exist (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # symbols already loaded into the process: libc's
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def reuse_heap(limit_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed buffers up to `limit_bytes` in the heap for reuse.

    By default glibc serves each large tensor with a fresh mmap and unmaps it on free, so every
    request page-faults all its activations again; on the CPU that measured 10-15% of synthesis
    time. Kept pages make RSS settle at the working set's high-water mark instead (flat after
    warm-up). Returns False where mallopt does not exist (musl, macOS, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it restarts at exec, so a child
    process reports its own peak, not the parent's. 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def is_oom_error(exc: BaseException) -> bool:
    """True for errors that mean "an allocation failed", whichever allocator raised them."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    from edge_runtime.errors import EdgeRuntimeError

    if isinstance(exc, EdgeRuntimeError):  # our own verdict after recovery failed: not retryable
        return False
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(marker in message for marker in _OOM_MARKERS)
    return False


class MemoryGovernor:
    """Applies one cleanup policy after each request (or batch).

    Policies: `per_request` cleans every call; `every_n` every Nth call; `off` never; `threshold`
    cleans when the CUDA caching allocator is fragmented, (reserved - allocated) / reserved >
    fragmentation_threshold. A CPU process has no such counter, so there `threshold` uses RSS growth
    instead: clean when RSS grew by more than `fragmentation_threshold` (a fraction) over the RSS the
    last cleanup left behind (or the first measurement). Re-basing after each cleanup stops a
    legitimately larger working set (warm caches) from triggering a cleanup on every request.
    Any cleanup, forced ones included, restarts the every-N count.

    `cleanup` is the profile's typed `cleanup` section (`policy.schema.Cleanup`): its values were
    checked there, the one place profile values are validated, so they are taken as they are.
    `stats` replaces the snapshot source (tests inject fragmentation numbers with it).
    """

    def __init__(self, cleanup: Cleanup, device: str | torch.device = "cpu", *,
                 stats: Callable[[], MemorySnapshot] | None = None, gc_generation: int = 2) -> None:
        self.policy = cleanup.policy
        self.every_n = cleanup.every_n
        self.threshold = cleanup.fragmentation_threshold
        self.malloc_trim = cleanup.malloc_trim
        self.gc_generation = int(gc_generation)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.device.type == "cuda" and not self._cuda:
            log.warning("memory governor: %s requested but CUDA is unavailable; watching RSS only", device)
        self._stats = stats or self._measure
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._since_cleanup = 0
        self._rss_baseline: int | None = None
        self.requests = 0
        self.cleanups = 0
        self.oom_recoveries = 0
        self.cleanup_seconds = 0.0
        self.last_reason: str | None = None

    # -- measuring ----------------------------------------------------------------------------
    def _measure(self) -> MemorySnapshot:
        rss = self._process.memory_info().rss
        if not self._cuda:
            return MemorySnapshot(rss_bytes=rss)
        return MemorySnapshot(rss_bytes=rss,
                              cuda_allocated=torch.cuda.memory_allocated(self.device),
                              cuda_reserved=torch.cuda.memory_reserved(self.device),
                              cuda_peak=torch.cuda.max_memory_allocated(self.device))

    def snapshot(self) -> MemorySnapshot:
        return self._stats()

    def stats(self) -> dict[str, Any]:
        return {"policy": self.policy, "requests": self.requests, "cleanups": self.cleanups,
                "oom_recoveries": self.oom_recoveries, "cleanup_seconds": self.cleanup_seconds,
                "last_reason": self.last_reason}

    # -- deciding -----------------------------------------------------------------------------
    def _due(self, snap: MemorySnapshot) -> str | None:
        """The reason to clean now, or None."""
        if self.policy == "per_request":
            return "per_request"
        if self.policy == "every_n":
            return f"every_n ({self.every_n})" if self._since_cleanup >= self.every_n else None
        if self.policy == "threshold":
            frag = snap.fragmentation
            if frag is not None:  # CUDA counters present: judge the caching allocator
                return f"fragmentation {frag:.2f} > {self.threshold:.2f}" if frag > self.threshold else None
            if self._rss_baseline is None:
                self._rss_baseline = snap.rss_bytes
                return None
            growth = (snap.rss_bytes - self._rss_baseline) / max(1, self._rss_baseline)
            return f"rss growth {growth:.2f} > {self.threshold:.2f}" if growth > self.threshold else None
        return None  # off

    def after_request(self) -> CleanupRecord:
        """Call once after each request or batch; cleans when the policy says so."""
        with self._lock:
            self.requests += 1
            self._since_cleanup += 1
            if self.policy == "off":
                return CleanupRecord(False, "policy off")
            before = self._stats()
            reason = self._due(before)
            if reason is None:
                return CleanupRecord(False, "not due", before=before)
            return self._clean(reason, before)

    # -- cleaning -----------------------------------------------------------------------------
    def cleanup(self, reason: str = "forced") -> CleanupRecord:
        """Clean now, whatever the policy says."""
        with self._lock:
            return self._clean(reason, self._stats())

    def recover_from_oom(self) -> CleanupRecord:
        """After an out-of-memory error: free what can be freed before the caller retries."""
        with self._lock:
            self.oom_recoveries += 1
            return self._clean("oom", self._stats())

    def _clean(self, reason: str, before: MemorySnapshot) -> CleanupRecord:
        start = time.perf_counter()
        gc.collect(self.gc_generation)  # first, so tensors freed by cycles reach the caches below
        if self._cuda:
            torch.cuda.empty_cache()  # return unused cached blocks to the driver
            torch.cuda.reset_peak_memory_stats(self.device)  # next peak is measured from here
        trimmed = False
        if self.malloc_trim and _malloc_trim is not None:
            _malloc_trim(0)  # glibc keeps freed heap pages; hand them back to the OS
            trimmed = True
        seconds = time.perf_counter() - start
        self.cleanups += 1
        self.cleanup_seconds += seconds
        self.last_reason = reason
        self._since_cleanup = 0
        if self.policy == "threshold" and before.fragmentation is None:
            self._rss_baseline = self._stats().rss_bytes  # growth is judged from what cleaning left
        return CleanupRecord(True, reason, seconds, trimmed, before)

    # -- garbage-collector baseline -----------------------------------------------------------
    @staticmethod
    def freeze_baseline() -> int:
        """Collect once, then move every live object into Python's permanent generation so later
        full collections only scan objects created since (the loaded model, torch's own heap).
        Frozen objects are never collected: call `release_baseline()` before unloading a model."""
        gc.collect()
        gc.freeze()
        return gc.get_freeze_count()

    @staticmethod
    def release_baseline() -> None:
        gc.unfreeze()


class OOMInjector:
    """Raises `torch.cuda.OutOfMemoryError` from a module's forward, for tests and soak runs.

    Every forward is counted. From the `on_call`-th forward on, a forward raises while fewer than
    `times` errors were raised (None: no limit) and, when `only_batch_above` is k, only if its batch
    (size of dim `batch_dim` of the first tensor argument) is larger than k, so a caller that splits
    the batch and retries gets through. Use as a context manager, or `install()` / `remove()`.
    """

    def __init__(self, module: torch.nn.Module, *, on_call: int = 1, times: int | None = 1,
                 only_batch_above: int | None = None, batch_dim: int = 0) -> None:
        if on_call < 1:
            raise ValueError(f"on_call counts forwards from 1, got {on_call}")
        self.module = module
        self.on_call = on_call
        self.times = times
        self.only_batch_above = only_batch_above
        self.batch_dim = batch_dim
        self.calls = 0
        self.raised = 0
        self._handle: Any = None

    def _batch_size(self, args: tuple, kwargs: dict) -> int | None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > self.batch_dim:
                return int(value.shape[self.batch_dim])
        return None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.calls < self.on_call or (self.times is not None and self.raised >= self.times):
            return None
        batch = self._batch_size(args, kwargs)
        if self.only_batch_above is not None and (batch is None or batch <= self.only_batch_above):
            return None
        self.raised += 1
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Injected by OOMInjector on forward {self.calls} "
            f"of {type(module).__name__} (batch {batch})")

    def install(self) -> OOMInjector:
        if self._handle is None:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> OOMInjector:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
