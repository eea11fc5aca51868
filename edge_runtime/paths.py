"""Per-user folders (XDG on Linux), used when a profile leaves a folder as null."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Disposable files: offload spill, compiled kernels. $EDGE_RUNTIME_CACHE_DIR overrides."""
    env = os.environ.get("EDGE_RUNTIME_CACHE_DIR")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge_runtime"
    return Path(env) if env else base


def data_dir() -> Path:
    """Files worth keeping: voices, the voice library."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "edge_runtime"


def offload_dir(configured: str | None = None) -> Path:
    """Where disk/NVMe offload files go: the profile's offload.offload_dir, else the cache dir."""
    return Path(configured).expanduser() if configured else cache_dir() / "offload"
