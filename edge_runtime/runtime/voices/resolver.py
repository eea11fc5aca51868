"""Voice ids -> prepared voices: the in-process cache first, then the (possibly shared) library.
A damaged library entry is never served: it is rebuilt from its source when the source is whole,
else removed, so the next upload of the clip recreates it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices.cache import VoiceCache
from edge_runtime.runtime.voices.library import DamagedVoiceError, VoiceLibrary, VoiceSource

log = logging.getLogger(__name__)

Prepare = Callable[[np.ndarray, int, "str | None"], PreparedVoice]


class VoiceUnavailableError(ValueError):
    """The id's library entry was damaged and could not be rebuilt."""


class VoiceResolver:
    """`recheck_s`: a cached voice that came from the library is looked up there again at most this
    often, so a voice deleted through another server sharing the library stops being served here
    too (0: on every request; None: never)."""

    def __init__(self, cache: VoiceCache, library: Callable[[], VoiceLibrary], model_id: str,
                 prepare: Prepare, recheck_s: float | None = 5.0) -> None:
        self.cache = cache
        self.recheck_s = recheck_s
        self._checked: dict[str, float] = {}  # library voices in the cache -> when last seen there
        self._lock = threading.Lock()
        self._library = library  # opened on first use: a server that never sees a voice id never touches it
        self._opened: VoiceLibrary | None = None
        self.model_id = model_id
        self.prepare = prepare
        self.rebuilt = 0  # damaged entries rebuilt from their source (a metric)

    @property
    def library(self) -> VoiceLibrary:
        if self._opened is None:
            self._opened = self._library()
        return self._opened

    def lookup(self, voice_id: str) -> PreparedVoice | None:
        """The prepared voice, or None when neither the cache nor the library has it."""
        cached = self.cache.get(voice_id)
        if cached is not None and self._still_in_library(voice_id):
            return cached
        library = self.library
        try:
            voice = library.load(voice_id, device=self.cache.device)
        except FileNotFoundError:
            return None
        except DamagedVoiceError as exc:
            voice = self._rebuild(voice_id, str(exc))
        if voice.model_id != self.model_id:
            raise ValueError(f"voice {voice_id!r} was prepared for {voice.model_id}, not {self.model_id}")
        self._seen(voice_id)
        return self.cache.put(voice_id, voice)

    def _seen(self, voice_id: str) -> None:
        with self._lock:
            self._checked[voice_id] = time.monotonic()

    def _still_in_library(self, voice_id: str) -> bool:
        """False (and the cache entry dropped) when a library voice was deleted from the library."""
        with self._lock:
            checked = self._checked.get(voice_id)
        if checked is None or self.recheck_s is None or time.monotonic() - checked < self.recheck_s:
            return True  # not a library voice (prepared here from a prompt), or seen there lately
        if voice_id in self.library:
            self._seen(voice_id)
            return True
        with self._lock:
            self._checked.pop(voice_id, None)
        self.cache.remove(voice_id)
        return False

    def _rebuild(self, voice_id: str, damage: str) -> PreparedVoice:
        library = self.library
        try:
            source = library.load_source(voice_id)
        except (FileNotFoundError, DamagedVoiceError) as exc:
            library.discard_prepared(voice_id)
            raise VoiceUnavailableError(
                f"voice {voice_id}: {damage}; it cannot be rebuilt ({exc}), so it was removed from the "
                "library: upload the prompt again") from None
        if source.model_id != self.model_id:
            raise ValueError(f"voice {voice_id!r} was prepared for {source.model_id}, not {self.model_id}")
        log.warning("voice %s: %s; rebuilding it from its source", voice_id, damage)
        voice = self.prepare(source.samples, source.sample_rate, source.transcript)
        library.save(voice_id, voice)  # the source is whole: rewrite the prepared object only
        self.rebuilt += 1
        return voice

    def keep(self, voice_id: str, voice: PreparedVoice, source: VoiceSource) -> bool:
        """Put a voice in the library with its source unless a whole entry is there; True if written."""
        library = self.library
        if voice_id in library and library.has_source(voice_id):
            try:  # read whole: a truncated entry is rewritten, not counted as present
                library.load(voice_id)
                library.load_source(voice_id)
                self._seen(voice_id)
                return False
            except (FileNotFoundError, DamagedVoiceError):
                pass
        library.save(voice_id, voice, source)
        self._seen(voice_id)
        return True
