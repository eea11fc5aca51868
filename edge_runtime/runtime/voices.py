"""Prepared voice prompts: content-hash keys, a bounded LRU cache, and an on-disk library.

Preparing a cloning prompt (features, speaker embedding, prompt tokens) is costly and the same
reference clip comes back request after request, so prepared prompts are cached in memory, bounded
by entries *and* bytes, and can be saved as safetensors + JSON (never pickle) under a content-hash id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.prepared_voice import PreparedVoice

log = logging.getLogger(__name__)

_KEY_VERSION = b"edge_runtime.voice_key.v1\0"  # bump when the normalisation below changes
_VOICE_ID = re.compile(r"^[0-9a-f]{16,64}$")


# -- keys ---------------------------------------------------------------------------------------
def _normalise_audio(audio: np.ndarray) -> np.ndarray:
    """Canonical float32 mono, peak 1.0 (silence stays zero).

    Cast to float32 *first*: float64 audio and its float32 rounding then hash the same. Peak
    normalisation in float32 makes the key blind to gain by powers of two and to the PCM format
    (int16 / int32 / float give bit-identical results, since int/2^k is exact). Arbitrary gains
    (x0.7) usually change the last bit of some samples and so the key: this is a content hash, not
    a perceptual fingerprint; no rounding grid can fix that (some samples always sit on a boundary),
    and a miss only costs one preparation.
    """
    data = np.asarray(audio)
    if data.ndim == 2:  # (frames, channels), soundfile's layout
        data = data.astype(np.float32).mean(axis=1, dtype=np.float32)
    elif data.ndim != 1:
        raise ValueError(f"voice audio must be 1-D mono or 2-D (frames, channels); got shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.size == 0:
        raise ValueError("voice audio is empty")
    if not np.isfinite(data).all():
        raise ValueError("voice audio contains NaN or infinite samples")
    peak = np.abs(data).max()
    if peak > 0:
        data = data / peak
    return (data + np.float32(0.0)).astype("<f4", copy=False)  # + 0.0 turns -0.0 into 0.0


def _normalise_transcript(transcript: str | None) -> str | None:
    if transcript is None:
        return None
    text = " ".join(unicodedata.normalize("NFC", transcript).split())  # NFC + collapse whitespace
    return text or None


def voice_key(audio: np.ndarray, sample_rate: int, model_id: str, transcript: str | None = None) -> str:
    """sha256 (64 hex chars, a valid VoiceLibrary id) of the normalised audio, sample rate, model
    id and transcript: the same clip prepared for another model or transcript is another voice."""
    header = json.dumps({"sample_rate": int(sample_rate), "model_id": str(model_id),
                         "transcript": _normalise_transcript(transcript)}, sort_keys=True)
    digest = hashlib.sha256(_KEY_VERSION)
    digest.update(header.encode("utf-8") + b"\0")
    digest.update(_normalise_audio(audio).tobytes())
    return digest.hexdigest()


# -- cache --------------------------------------------------------------------------------------
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


# -- on-disk library ----------------------------------------------------------------------------
def check_voice_id(voice_id: str) -> str:
    """Voice ids are content hashes (16-64 lowercase hex), never paths."""
    if not isinstance(voice_id, str) or not _VOICE_ID.fullmatch(voice_id):
        raise ValueError(f"invalid voice id {voice_id!r}: expected 16 to 64 lowercase hex characters "
                         "(a content hash such as voice_key(...))")
    return voice_id


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`: readers
    see the old file or the new one, never half of one."""
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


class VoiceLibrary:
    """Prepared voices on disk: `<root>/<id>.safetensors` (tensors) + `<root>/<id>.json` (metadata).

    The JSON is written last and deleted first, so a voice is listed only when both files are whole.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, voice_id: str) -> tuple[Path, Path]:
        check_voice_id(voice_id)
        return self.root / f"{voice_id}.safetensors", self.root / f"{voice_id}.json"

    def save(self, voice_id: str, voice: PreparedVoice) -> None:
        weights, meta = self._paths(voice_id)
        numpy_names = sorted(n for n, v in voice.tensors.items() if isinstance(v, np.ndarray))
        # safetensors wants contiguous CPU tensors that share no storage with each other
        tensors = {name: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
                   .detach().to("cpu").contiguous().clone() for name, v in voice.tensors.items()}
        metadata = {"format": 1, "model_id": voice.model_id, "sample_rate": int(voice.sample_rate),
                    "transcript": voice.transcript, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "tensors": sorted(tensors), "numpy": numpy_names, "extra": voice.extra}
        text = json.dumps(metadata, indent=2, sort_keys=True)  # fails before any write if extra isn't JSON
        _atomic_write(weights, lambda tmp: save_file(tensors, tmp))
        _atomic_write(meta, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def load(self, voice_id: str, device: str | torch.device = "cpu") -> PreparedVoice:
        weights, meta = self._paths(voice_id)
        if not meta.is_file() or not weights.is_file():
            raise FileNotFoundError(f"voice {voice_id} is not in the library at {self.root}")
        metadata = json.loads(meta.read_text(encoding="utf-8"))
        tensors: dict[str, Any] = load_file(str(weights), device=str(device))
        if sorted(tensors) != sorted(metadata["tensors"]):
            raise ValueError(f"voice {voice_id}: tensors {sorted(tensors)} do not match its metadata "
                             f"{sorted(metadata['tensors'])}; the library entry is damaged")
        for name in metadata.get("numpy", []):
            tensors[name] = tensors[name].cpu().numpy()
        return PreparedVoice(tensors=tensors, model_id=metadata["model_id"],
                             sample_rate=int(metadata["sample_rate"]), transcript=metadata.get("transcript"),
                             extra=metadata.get("extra", {}))

    def metadata(self, voice_id: str) -> dict[str, Any]:
        _, meta = self._paths(voice_id)
        if not meta.is_file():
            raise FileNotFoundError(f"voice {voice_id} is not in the library at {self.root}")
        return json.loads(meta.read_text(encoding="utf-8"))

    def list(self) -> list[str]:
        """Ids with both files present, sorted."""
        return sorted(p.stem for p in self.root.glob("*.json")
                      if _VOICE_ID.fullmatch(p.stem) and p.with_suffix(".safetensors").is_file())

    def __contains__(self, voice_id: str) -> bool:
        weights, meta = self._paths(voice_id)
        return meta.is_file() and weights.is_file()

    def delete(self, voice_id: str) -> bool:
        weights, meta = self._paths(voice_id)
        existed = meta.is_file() or weights.is_file()
        meta.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        return existed
