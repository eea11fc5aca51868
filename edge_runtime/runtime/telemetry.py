"""Per-request telemetry: one record per request, a bounded in-memory window, optional JSONL file.

The window is a fixed-size deque so a server running for weeks holds at most `keep_last` records;
the file (when given) keeps the full history on disk, one JSON object per line.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import numpy as np


@dataclass
class RequestTelemetry:
    """What one request cost. CUDA fields are None when the runtime is not on CUDA."""

    request_id: str
    model: str
    latency_s: float = 0.0
    audio_seconds: float = 0.0
    rtf: float | None = None  # latency / audio seconds; < 1 is faster than real time
    time_to_first_audio_s: float | None = None
    batch_size: int = 1
    voice_cache: str = "none"  # 'hit' | 'miss' (prepared now) | 'library' (read from the voice library) | 'none'
    rss_bytes: int | None = None
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    cuda_peak: int | None = None
    cleaned: bool = False
    error: str | None = None
    timestamp: float = field(default_factory=time.time)  # Unix seconds, when the record was made

    def to_dict(self) -> dict[str, Any]:
        # Strict JSON has no NaN / Infinity: write them as null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class TelemetryLog:
    """Thread-safe sink for `RequestTelemetry` records."""

    def __init__(self, path: str | os.PathLike | None = None, keep_last: int = 1000) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.path = os.fspath(path) if path is not None else None
        self._window: deque[RequestTelemetry] = deque(maxlen=keep_last)
        self._lock = threading.Lock()
        self._total = 0
        self._total_errors = 0
        self._file: IO[str] | None = None
        if self.path is not None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            # Line-buffered append: each record reaches the OS as one whole line, so a crash loses
            # at most the record being written and readers (tail -f) see complete lines.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def record(self, item: RequestTelemetry) -> None:
        line = item.to_json() if self._file is not None else None
        with self._lock:
            self._window.append(item)
            self._total += 1
            self._total_errors += item.error is not None
            if self._file is not None:
                self._file.write(line + "\n")

    def last(self) -> RequestTelemetry | None:
        with self._lock:
            return self._window[-1] if self._window else None

    def recent(self, n: int | None = None) -> list[RequestTelemetry]:
        """The newest `n` records kept in memory (all of the window when n is None), oldest first."""
        with self._lock:
            items = list(self._window)
        return items if n is None else items[-n:] if n > 0 else []

    def __len__(self) -> int:
        with self._lock:
            return len(self._window)

    def summary(self) -> dict[str, Any]:
        """Totals since start; latency and RTF statistics over the in-memory window's successful
        requests (failures are counted, not timed: a fast failure would flatter the percentiles)."""
        with self._lock:
            items = list(self._window)
            total, total_errors = self._total, self._total_errors
        ok = [r for r in items if r.error is None]
        latencies = [r.latency_s for r in ok]
        rtfs = [r.rtf for r in ok if r.rtf is not None and math.isfinite(r.rtf)]
        cache = {"hit": 0, "miss": 0, "library": 0, "none": 0}
        for r in items:
            cache[r.voice_cache] = cache.get(r.voice_cache, 0) + 1
        return {
            "requests": total,
            "errors": total_errors,
            "window": len(items),
            "window_errors": len(items) - len(ok),
            "cleaned": sum(r.cleaned for r in items),
            "latency_p50_s": _percentile(latencies, 50),
            "latency_p95_s": _percentile(latencies, 95),
            "rtf_mean": float(np.mean(rtfs)) if rtfs else None,
            "audio_seconds": float(sum(r.audio_seconds for r in ok)),
            "voice_cache": cache,
        }

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> TelemetryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
