"""Measured transfer rates for the planner's cost model (`edge-runtime doctor --bandwidth`).

What offload pays for, measured on this machine:

* host->device with pinned and with pageable host memory, device->host pinned (CUDA only);
* disk read of a freshly written file in the offload folder, dropped from the page cache first
  (fsync + POSIX_FADV_DONTNEED, checked with mincore) so the figure is the drive's, not RAM's;
  on tmpfs, or where dropping fails, the result says the read was cached;
* host memory copy (torch ``copy_``), the ceiling for CPU-side staging.

Rates are bytes per second, the median of a few repeats after a warm-up. ``save()`` writes the
result as JSON in the cache dir; ``cost_model_from_measurement()`` hands it to the planner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from edge_runtime import paths

MIB = 1024 ** 2
DEFAULT_SIZE_BYTES = 256 * MIB
DEFAULT_REPEATS = 3
FILENAME = "bandwidth.json"
_CHUNK = 8 * MIB  # file I/O chunk: large enough that syscall overhead is noise
_CACHED_LIMIT = 0.05  # more than 5% of the file still in the page cache: not dropped


@dataclass
class Bandwidth:
    device: str  # CUDA device name the host<->device figures belong to, or "cpu"
    measured_at: str  # ISO 8601, UTC
    size_bytes: int
    repeats: int
    h2d_pinned_bytes_per_s: Optional[float] = None
    h2d_pageable_bytes_per_s: Optional[float] = None
    d2h_pinned_bytes_per_s: Optional[float] = None
    disk_read_bytes_per_s: Optional[float] = None
    disk_write_bytes_per_s: Optional[float] = None  # write + fsync of the test file
    disk_cache_dropped: Optional[bool] = None  # False: the read was served (partly) from RAM
    disk_path: Optional[str] = None
    memcpy_bytes_per_s: Optional[float] = None  # bytes copied per second (each read and written once)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Bandwidth":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def rows(self) -> list[tuple[str, str]]:
        """(path, "N.NN GB/s" or why there is no figure), for a table."""
        def fmt(v: Optional[float], missing: str) -> str:
            return missing if v is None else f"{v / 1e9:.2f} GB/s"

        disk = fmt(self.disk_read_bytes_per_s, "not measured")
        if self.disk_read_bytes_per_s is not None and not self.disk_cache_dropped:
            disk += " (page cache not dropped: RAM speed, not the drive's)"
        return [("host->device, pinned", fmt(self.h2d_pinned_bytes_per_s, "no CUDA device")),
                ("host->device, pageable", fmt(self.h2d_pageable_bytes_per_s, "no CUDA device")),
                ("device->host, pinned", fmt(self.d2h_pinned_bytes_per_s, "no CUDA device")),
                ("disk read, offload dir", disk),
                ("disk write + fsync", fmt(self.disk_write_bytes_per_s, "not measured")),
                ("host memory copy", fmt(self.memcpy_bytes_per_s, "not measured"))]


# --- measuring ------------------------------------------------------------------------------

def _timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _rate(n_bytes: int, seconds: list[float]) -> float:
    return n_bytes / max(statistics.median(seconds), 1e-9)


def measure_memcpy(size_bytes: int, repeats: int) -> float:
    import torch

    src = torch.ones(size_bytes, dtype=torch.uint8)  # written: its pages exist before timing
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: faults dst's pages in
    return _rate(size_bytes, [_timed(lambda: dst.copy_(src)) for _ in range(repeats)])


def measure_cuda(size_bytes: int, repeats: int, device: Any = None) -> dict[str, Any]:
    """Host<->device rates and the device name; {} without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return {}
    dev = torch.device(device if device is not None else "cuda")
    sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    gpu = torch.empty(size_bytes, dtype=torch.uint8, device=dev)
    pinned = torch.ones(size_bytes, dtype=torch.uint8).pin_memory()  # pinned once, up front (FACTS)
    pageable = torch.ones(size_bytes, dtype=torch.uint8)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev)}
    cases = (("h2d_pinned_bytes_per_s", lambda: gpu.copy_(pinned, non_blocking=True)),
             ("h2d_pageable_bytes_per_s", lambda: gpu.copy_(pageable)),
             ("d2h_pinned_bytes_per_s", lambda: pinned.copy_(gpu, non_blocking=True)))
    for key, copy in cases:
        _timed(copy, sync)  # warm-up: the first copy sets up the DMA mappings
        out[key] = _rate(size_bytes, [_timed(copy, sync) for _ in range(repeats)])
    del gpu, pinned, pageable
    torch.cuda.empty_cache()
    return out


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def cached_fraction(fd: int, size: int) -> Optional[float]:
    """Fraction of the file's pages now in the page cache (mincore); None where it cannot be asked.
    Mapping a file does not read it, so asking does not change the answer."""
    try:
        libc = _libc()
        if libc is None or size <= 0:
            return None
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    except (OSError, AttributeError, ValueError):
        return None


def _drop_cache(fd: int, size: int) -> tuple[bool, Optional[str]]:
    """Evict the (fsynced, so clean) file from the page cache. Returns (dropped, note)."""
    if not hasattr(os, "posix_fadvise"):
        return False, "os.posix_fadvise is unavailable here: the disk read may come from the page cache"
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        return False, f"posix_fadvise failed ({exc}): the disk read may come from the page cache"
    left = cached_fraction(fd, size)
    if left is None:
        return True, "page cache drop requested but not verified (mincore unavailable)"
    if left > _CACHED_LIMIT:
        return False, (f"{left:.0%} of the test file stayed in the page cache (tmpfs or a filesystem "
                       "that ignores fadvise): the disk figure is memory speed")
    return True, None


def measure_disk(directory: Path, size_bytes: int, repeats: int) -> dict[str, Any]:
    """Write ``size_bytes`` to a temp file in ``directory`` (fsync), then read it back ``repeats``
    times, dropping it from the page cache before each read. The file is removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    # Random bytes, repeated: a compressing filesystem cannot shrink them, and urandom of only
    # one chunk keeps the setup cheap.
    chunk = os.urandom(min(_CHUNK, size_bytes))
    fd, name = tempfile.mkstemp(prefix="bandwidth-", suffix=".bin", dir=directory)
    notes: list[str] = []
    try:
        def write() -> None:
            left = size_bytes
            while left > 0:
                left -= os.write(fd, chunk[:min(len(chunk), left)])
            os.fsync(fd)  # dirty pages cannot be dropped; and the write is only done when on disk

        write_s = _timed(write)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)

        def read() -> None:
            os.lseek(fd, 0, os.SEEK_SET)
            while os.readv(fd, [view]) > 0:
                pass

        seconds, dropped = [], True
        for _ in range(max(1, repeats)):
            ok, note = _drop_cache(fd, size_bytes)
            dropped = dropped and ok
            if note and note not in notes:
                notes.append(note)
            seconds.append(_timed(read))
        return {"disk_read_bytes_per_s": _rate(size_bytes, seconds),
                "disk_write_bytes_per_s": size_bytes / max(write_s, 1e-9),
                "disk_cache_dropped": dropped, "disk_path": str(directory), "notes": notes}
    finally:
        os.close(fd)
        os.unlink(name)


def measure(size_bytes: int = DEFAULT_SIZE_BYTES, repeats: int = DEFAULT_REPEATS,
            disk_dir: Optional[Path] = None, cuda: bool = True, device: Any = None) -> Bandwidth:
    """Every rate this machine has (see the module docstring). ``disk_dir``: where to test the
    disk (default: the offload folder, paths.offload_dir())."""
    if size_bytes < MIB:
        raise ValueError("size_bytes must be at least 1 MiB for a meaningful rate")
    repeats = max(1, int(repeats))
    result = Bandwidth(device="cpu", measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       size_bytes=int(size_bytes), repeats=repeats)
    if cuda:
        for key, value in measure_cuda(size_bytes, repeats, device).items():
            setattr(result, key, value)
    try:
        disk = measure_disk(Path(disk_dir) if disk_dir else paths.offload_dir(), size_bytes, repeats)
        result.notes += disk.pop("notes")
        for key, value in disk.items():
            setattr(result, key, value)
    except OSError as exc:  # read-only or full offload folder: report it, measure the rest
        result.notes.append(f"disk not measured: {exc}")
    result.memcpy_bytes_per_s = measure_memcpy(size_bytes, repeats)
    return result


# --- persistence ----------------------------------------------------------------------------

def default_path() -> Path:
    return paths.cache_dir() / FILENAME


def save(result: Bandwidth, path: Optional[Path] = None) -> Path:
    """Write ``result`` as JSON atomically (temp file in the same folder + rename)."""
    path = Path(path) if path else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_measured(path: Optional[Path] = None) -> Optional[Bandwidth]:
    """The saved measurement, or None when there is none or it cannot be read."""
    path = Path(path) if path else default_path()
    try:
        return Bandwidth.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


# --- the planner's view ---------------------------------------------------------------------

def cost_model_from_measurement(measured: Optional[Bandwidth] = None, base=None,
                                load: bool = True) -> tuple[Any, str]:
    """(CostModel, one-line note saying which figures it uses). Pinned host->device and disk
    read replace the defaults when measured; a disk figure read from the page cache does not.
    ``measured``: a Bandwidth; None loads the saved one (unless ``load`` is False)."""
    from edge_runtime.policy.planner.cost import CostModel

    cost = base or CostModel()
    if measured is None and load:
        measured = load_measured()
    h2d_src, disk_src = "PCIe 4.0 default, unmeasured", "SSD default, unmeasured"
    if measured is not None:
        when = f"measured {measured.measured_at}"
        if measured.h2d_pinned_bytes_per_s:
            cost = cost.with_measured_h2d(measured.h2d_pinned_bytes_per_s)
            h2d_src = f"{when} on {measured.device}"
        else:
            h2d_src = "PCIe 4.0 default; no CUDA device when measured"
        if measured.disk_read_bytes_per_s and measured.disk_cache_dropped:
            cost = cost.with_measured_disk(measured.disk_read_bytes_per_s)
            disk_src = f"{when} at {measured.disk_path}"
        elif measured.disk_read_bytes_per_s:
            disk_src = "default; the measured read came from the page cache"
    note = (f"cost model: host->device {cost.h2d_bytes_per_s / 1e9:.1f} GB/s ({h2d_src}), "
            f"disk read {cost.disk_bytes_per_s / 1e9:.1f} GB/s ({disk_src})")
    if measured is None:
        note += "; run `edge-runtime doctor --bandwidth` to measure"
    return cost, note
