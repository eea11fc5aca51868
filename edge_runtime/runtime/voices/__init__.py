"""Prepared voice prompts: content-hash keys (keys.py), a bounded LRU cache (cache.py) and an on-disk
library (library.py). Preparing a cloning prompt is costly and the same reference clip comes back
request after request, so prepared prompts are cached, bounded by entries and bytes, and can be saved."""

from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices.cache import VoiceCache
from edge_runtime.runtime.voices.keys import check_voice_id, voice_key
from edge_runtime.runtime.voices.library import VoiceLibrary

__all__ = ["PreparedVoice", "VoiceCache", "VoiceLibrary", "check_voice_id", "voice_key"]
