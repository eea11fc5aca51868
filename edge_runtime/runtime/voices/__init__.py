"""Prepared voice prompts: content-hash keys (keys.py), a bounded LRU cache (cache.py), the voice
library on a folder or fsspec URL that servers may share (library.py over storage.py), and the
resolver that looks an id up in both and rebuilds damaged entries (resolver.py). Preparing a cloning
prompt is costly and the same reference clip comes back request after request, so prepared prompts
are cached, bounded by entries and bytes, and kept in the library."""

from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices.cache import VoiceCache
from edge_runtime.runtime.voices.keys import check_voice_id, is_voice_id, voice_key
from edge_runtime.runtime.voices.library import DamagedVoiceError, VoiceLibrary, VoiceSource

__all__ = ["DamagedVoiceError", "PreparedVoice", "VoiceCache", "VoiceLibrary", "VoiceSource", "check_voice_id",
           "is_voice_id", "voice_key"]
