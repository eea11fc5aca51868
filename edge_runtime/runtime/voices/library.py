"""The on-disk voice library: prepared prompts saved as safetensors + JSON (never pickle) under their
content-hash id, written atomically, so they survive restarts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices.keys import check_voice_id, is_voice_id
from edge_runtime.paths import atomic_write





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
        atomic_write(weights, lambda tmp: save_file(tensors, tmp))
        atomic_write(meta, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

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
                      if is_voice_id(p.stem) and p.with_suffix(".safetensors").is_file())

    def __contains__(self, voice_id: str) -> bool:
        weights, meta = self._paths(voice_id)
        return meta.is_file() and weights.is_file()

    def delete(self, voice_id: str) -> bool:
        weights, meta = self._paths(voice_id)
        existed = meta.is_file() or weights.is_file()
        meta.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        return existed
