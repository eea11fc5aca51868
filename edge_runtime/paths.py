"""Per-user folders (XDG on Linux), used when a profile leaves a folder as null."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder (created if missing), fsync it, then
    rename it over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
