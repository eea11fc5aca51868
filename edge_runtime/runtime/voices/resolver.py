"""Voice ids -> prepared voices: the in-process cache first, then the (possibly shared) library.
A damaged library entry is never served: it is rebuilt from its source when the source is whole,
else removed, so the next upload of the clip recreates it."""

from __future__ import annotations

import logging
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
    def __init__(self, cache: VoiceCache, library: Callable[[], VoiceLibrary], model_id: str,
                 prepare: Prepare) -> None:
        self.cache = cache
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
        if cached is not None:
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
        return self.cache.put(voice_id, voice)

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
                return False
            except (FileNotFoundError, DamagedVoiceError):
                pass
        library.save(voice_id, voice, source)
        return True
