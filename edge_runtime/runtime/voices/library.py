"""The voice library: the source of truth for uploaded voices, on a folder or an fsspec URL that
several servers may share. The in-process VoiceCache only caches what is here.

Each voice is two safetensors objects (never pickle), named by its content-hash id:
  <id>.source.safetensors  the prompt as the model was given it (clean mono samples), written first;
  <id>.safetensors         the prepared voice (codes, latents, embeddings) the model consumes.
Each carries its metadata and a sha256 of its tensor bytes in the safetensors header, so a
truncated or corrupt object is detected on read (DamagedVoiceError) and never served; the prepared
object can then be rebuilt from the source (runtime/voices/resolver.py). Objects are replaced
whole (storage.py), so concurrent writers of one voice leave one intact entry.

Entries written before the source existed (format 1: <id>.safetensors + <id>.json) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices.keys import check_voice_id, is_voice_id
from edge_runtime.runtime.voices.storage import open_storage

FORMAT = 2
_META_KEY = "edge_runtime"
_PREPARED, _SOURCE, _LEGACY_META = ".safetensors", ".source.safetensors", ".json"


class DamagedVoiceError(ValueError):
    """A library object exists but is truncated, corrupt or inconsistent."""


@dataclass(frozen=True, eq=False)
class VoiceSource:
    """The prompt a voice was prepared from: enough to prepare it again, on any replica."""

    samples: np.ndarray  # float32 mono, at sample_rate, as the model's prepare_voice received it
    sample_rate: int
    model_id: str
    transcript: str | None = None


def _encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """safetensors bytes whose header holds `meta` plus the sha256 of the tensor bytes after it."""
    plain = save_bytes(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    digest = hashlib.sha256(plain[8 + struct.unpack("<Q", plain[:8])[0]:]).hexdigest()
    # the tensor bytes do not depend on the header, so the digest still holds after re-encoding
    return save_bytes(tensors, metadata={_META_KEY: json.dumps({**meta, "sha256": digest}, sort_keys=True)})


def _header(data: bytes, where: str) -> tuple[dict[str, Any], int]:
    """(safetensors header, its end offset); DamagedVoiceError when the bytes are not one."""
    if len(data) < 8:
        raise DamagedVoiceError(f"{where} is truncated ({len(data)} bytes)")
    size = struct.unpack("<Q", data[:8])[0]
    if size > 100 * 1024 * 1024 or len(data) < 8 + size:
        raise DamagedVoiceError(f"{where} is truncated (its header says {size} bytes, {len(data) - 8} follow)")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DamagedVoiceError(f"{where} has a corrupt header") from None
    if not isinstance(header, dict):
        raise DamagedVoiceError(f"{where} has a corrupt header")
    return header, 8 + size


def _our_meta(header: dict[str, Any], where: str) -> dict[str, Any] | None:
    text = (header.get("__metadata__") or {}).get(_META_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DamagedVoiceError(f"{where} has corrupt metadata") from None


def _decode(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and our metadata, after checking the bytes against the recorded sha256."""
    header, end = _header(data, where)
    meta = _our_meta(header, where)
    if meta is not None and hashlib.sha256(data[end:]).hexdigest() != meta.get("sha256"):
        raise DamagedVoiceError(f"{where} is corrupt or truncated (its sha256 does not match)")
    try:
        return load_bytes(data), meta
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DamagedVoiceError(f"{where} cannot be read: {exc}") from None


class VoiceLibrary:
    """Prepared voices and their sources under `location` (a folder or an fsspec URL)."""

    def __init__(self, location: str | os.PathLike) -> None:
        self.storage = open_storage(location)
        self.location = self.storage.location

    @property
    def root(self):  # a folder library's path (tests and `voices` commands print it)
        return getattr(self.storage, "root", None)

    def where(self, voice_id: str, source: bool = False) -> str:
        return f"{self.location.rstrip('/')}/{voice_id}{_SOURCE if source else _PREPARED}"

    # -- writing ------------------------------------------------------------------------------
    def save(self, voice_id: str, voice: PreparedVoice, source: VoiceSource | None = None) -> None:
        """Write the source (when given) and then the prepared voice, each replaced whole."""
        check_voice_id(voice_id)
        numpy_names = sorted(n for n, v in voice.tensors.items() if isinstance(v, np.ndarray))
        # safetensors wants contiguous CPU tensors that share no storage with each other
        tensors = {name: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
                   .detach().to("cpu").contiguous().clone() for name, v in voice.tensors.items()}
        meta = {"format": FORMAT, "kind": "voice", "model_id": voice.model_id,
                "sample_rate": int(voice.sample_rate), "transcript": voice.transcript,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tensors": sorted(tensors),
                "numpy": numpy_names, "extra": voice.extra}
        json.dumps(meta)  # fails before any write if extra isn't JSON
        if source is not None:
            samples = torch.from_numpy(np.ascontiguousarray(source.samples, dtype=np.float32).copy())
            self.storage.write(voice_id + _SOURCE, _encode(
                {"samples": samples}, {"format": FORMAT, "kind": "source", "model_id": source.model_id,
                                       "sample_rate": int(source.sample_rate), "transcript": source.transcript}))
        self.storage.write(voice_id + _PREPARED, _encode(tensors, meta))
        self.storage.delete(voice_id + _LEGACY_META)  # a format-1 entry replaced by this one

    # -- reading ------------------------------------------------------------------------------
    def _read(self, voice_id: str, source: bool = False) -> bytes:
        data = self.storage.read(voice_id + (_SOURCE if source else _PREPARED))
        if data is None:
            what = "the source of voice" if source else "voice"
            raise FileNotFoundError(f"{what} {voice_id} is not in the library at {self.location}")
        return data

    def load(self, voice_id: str, device: str | torch.device = "cpu") -> PreparedVoice:
        """The prepared voice; FileNotFoundError when absent, DamagedVoiceError when damaged."""
        check_voice_id(voice_id)
        where = self.where(voice_id)
        tensors, meta = _decode(self._read(voice_id), where)
        if meta is None:
            meta = self._legacy_meta(voice_id)
        if meta.get("kind", "voice") != "voice" or sorted(tensors) != sorted(meta.get("tensors", [])):
            raise DamagedVoiceError(f"{where}: tensors {sorted(tensors)} do not match its metadata "
                                    f"{sorted(meta.get('tensors', []))}")
        tensors = {name: t.to(device) for name, t in tensors.items()}
        for name in meta.get("numpy", []):
            tensors[name] = tensors[name].cpu().numpy()
        return PreparedVoice(tensors=tensors, model_id=meta["model_id"], sample_rate=int(meta["sample_rate"]),
                             transcript=meta.get("transcript"), extra=meta.get("extra", {}))

    def load_source(self, voice_id: str) -> VoiceSource:
        check_voice_id(voice_id)
        where = self.where(voice_id, source=True)
        tensors, meta = _decode(self._read(voice_id, source=True), where)
        if meta is None or meta.get("kind") != "source" or set(tensors) != {"samples"}:
            raise DamagedVoiceError(f"{where} is not a voice source")
        return VoiceSource(samples=tensors["samples"].numpy(), sample_rate=int(meta["sample_rate"]),
                           model_id=meta["model_id"], transcript=meta.get("transcript"))

    def _legacy_meta(self, voice_id: str) -> dict[str, Any]:
        text = self.storage.read(voice_id + _LEGACY_META)
        if text is None:
            raise DamagedVoiceError(f"{self.where(voice_id)} has no metadata (a damaged or foreign file)")
        try:
            return json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedVoiceError(f"{voice_id}{_LEGACY_META} in {self.location} is corrupt") from None

    def metadata(self, voice_id: str) -> dict[str, Any]:
        """The prepared voice's metadata, from the header alone (no tensor bytes are read)."""
        check_voice_id(voice_id)
        where = self.where(voice_id)
        head = self._read_head(voice_id)
        header, _ = _header(head, where)
        return _our_meta(header, where) or self._legacy_meta(voice_id)

    def _read_head(self, voice_id: str) -> bytes:
        first = self.storage.read(voice_id + _PREPARED, length=8)
        if first is None:
            raise FileNotFoundError(f"voice {voice_id} is not in the library at {self.location}")
        if len(first) < 8:
            return first
        size = min(struct.unpack("<Q", first[:8])[0], 100 * 1024 * 1024 + 1)
        return first + (self.storage.read(voice_id + _PREPARED, length=size, offset=8) or b"")

    def has_source(self, voice_id: str) -> bool:
        return self.storage.exists(check_voice_id(voice_id) + _SOURCE)

    def list(self) -> list[str]:
        """Ids with a prepared object, sorted (whether each is whole is checked when it is read)."""
        return sorted(name[:-len(_PREPARED)] for name in self.storage.names()
                      if name.endswith(_PREPARED) and is_voice_id(name[:-len(_PREPARED)]))

    def __contains__(self, voice_id: str) -> bool:
        return self.storage.exists(check_voice_id(voice_id) + _PREPARED)

    # -- removing -----------------------------------------------------------------------------
    def discard_prepared(self, voice_id: str) -> None:
        """Drop a damaged prepared object (its source, if whole, rebuilds it)."""
        self.storage.delete(check_voice_id(voice_id) + _PREPARED)

    def delete(self, voice_id: str) -> bool:
        check_voice_id(voice_id)
        found = [self.storage.delete(voice_id + suffix) for suffix in (_LEGACY_META, _PREPARED, _SOURCE)]
        return any(found)
