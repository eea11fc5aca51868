"""The in-memory voice cache: prepared prompts in an LRU bounded by entries AND bytes; evicted
tensors are released. One preparation per key even when several requests ask at once."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from edge_runtime.prepared_voice import PreparedVoice

log = logging.getLogger(__name__)


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("voice cache: device %s requested but CUDA is unavailable; caching on cpu", device)
        return torch.device("cpu")
    return dev


def _own(value: Any, device: torch.device) -> Any:
    """A copy of `value` the cache can own: on its device, off the autograd graph, and not a view
    pinning a larger buffer (evicting it must free everything it stood for)."""
    if isinstance(value, torch.Tensor):
        t = value.detach() if value.requires_grad else value
        if t.device != device:
            t = t.to(device)
        if t.untyped_storage().nbytes() > t.nbytes:
            t = t.clone()
        return t
    if isinstance(value, np.ndarray):
        return value.copy() if value.base is not None else value
    raise TypeError(f"PreparedVoice tensors must be torch tensors or numpy arrays, got {type(value).__name__}")


class VoiceCache:
    """LRU of PreparedVoice bounded by `max_entries` and `max_bytes` (both always hold after a put).

    Thread-safe. `get_or_prepare` lets concurrent callers of one key share a single preparation.
    A limit of 0 disables caching (every put is rejected).
    """

    def __init__(self, max_entries: int, max_bytes: int, device: str | torch.device = "cpu") -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"voice cache limits must be >= 0, got {max_entries} entries / {max_bytes} bytes")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.device = _resolve_device(device)
        self._entries: OrderedDict[str, PreparedVoice] = OrderedDict()  # oldest first
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.rejected = self.coalesced = 0

    @classmethod
    def from_config(cls, config: Any) -> VoiceCache:
        """Build from any object with the profile's `voice_cache` attributes (max_mib in MiB)."""
        return cls(config.max_entries, int(config.max_mib * 1024 * 1024), device=config.device)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:  # no LRU or counter update
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> PreparedVoice | None:
        with self._lock:
            voice = self._entries.get(key)
            if voice is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return voice

    def put(self, key: str, voice: PreparedVoice) -> PreparedVoice:
        """Cache `voice` and return the cached copy, or return `voice` itself when it alone is over
        a limit (counted as rejected). Evicts least recently used entries until both limits hold."""
        size = voice.nbytes  # device moves keep sizes, so decide before copying anything
        if size > self.max_bytes or self.max_entries == 0:
            with self._lock:
                self.rejected += 1
            return voice
        owned = replace(voice, tensors={name: _own(v, self.device) for name, v in voice.tensors.items()})
        with self._lock:
            self._drop(key)
            self._entries[key] = owned
            self._sizes[key] = size
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
        return owned

    def _drop(self, key: str) -> bool:
        """Forget one entry (caller holds the lock); the cache held the only reference to it."""
        if self._entries.pop(key, None) is None:
            return False
        self._bytes -= self._sizes.pop(key)
        return True

    def get_or_prepare(self, key: str, prepare_fn: Callable[[], PreparedVoice]) -> tuple[PreparedVoice, bool]:
        """The cached voice (hit=True), or prepare_fn()'s result, cached (hit=False). Callers that
        arrive while another thread prepares the same key wait for it (counted as hits and as
        `coalesced`); if that preparation raises, they all see its exception. prepare_fn runs
        without the lock held, so it must not ask for the same key again."""
        with self._lock:
            voice = self._entries.get(key)
            if voice is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return voice, True
            pending = self._inflight.get(key)
            if pending is None:
                pending = self._inflight[key] = Future()
                self.misses += 1
                owner = True
            else:
                self.hits += 1
                self.coalesced += 1
                owner = False
        if not owner:
            return pending.result(), True
        try:
            voice = self.put(key, prepare_fn())
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(voice)
        finally:
            with self._lock:  # after put: a newcomer now finds the entry (or prepares anew if rejected)
                self._inflight.pop(key, None)
        return voice, False

    def remove(self, key: str) -> bool:
        with self._lock:
            return self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "rejected": self.rejected, "coalesced": self.coalesced, "entries": len(self._entries),
                    "bytes": self._bytes, "max_entries": self.max_entries, "max_bytes": self.max_bytes}
