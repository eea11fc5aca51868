"""A sharded checkpoint in Hugging Face's layout: ``<name>.index.json`` holding
{"metadata": {...}, "weight_map": {tensor name: shard file beside the index}}, each shard a
checkpoint file of its own (.safetensors, or a PyTorch state dict for ``pytorch_model.bin``
indexes). Each tensor is read and mapped from its own shard.

An *overlay* index (``"metadata": {"overlay": true}``, written by runtime/backends/quantized.py)
lays cached tensors over another checkpoint's files: it may name shards by absolute path, and a
shard may hold tensors the index leaves out (the ones the overlay replaces)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from edge_runtime.runtime.backends.base import BackendError
from edge_runtime.runtime.backends.checkpoint_source import CheckpointSource

_FORMAT = 'Hugging Face format: {"metadata": {...}, "weight_map": {"tensor name": "shard file"}}'


class ShardedCheckpoint(CheckpointSource):
    def __init__(self, index: str | Path, open_shard: Callable[[Path], CheckpointSource]) -> None:
        self.path = Path(index)
        weight_map, overlay = _weight_map(self.path)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        self._shards: dict[str, CheckpointSource] = {}
        for shard in by_shard:
            file = self.path.parent / shard  # an overlay's absolute path stays as it is
            if not file.is_file():
                raise BackendError(f"checkpoint index {self.path} names shard {file}, which does not "
                                   "exist: copy the whole checkpoint folder (index and every shard)")
            self._shards[shard] = open_shard(file)
        self._of = weight_map  # tensor name -> shard key
        self.entries = {}
        for shard, names in by_shard.items():
            held = self._shards[shard].entries
            lacking = [n for n in names if n not in held]
            if lacking:
                raise BackendError(f"checkpoint index {self.path} places {lacking[:5]} in shard "
                                   f"{self.path.parent / shard}, which lacks them")
            stray = [] if overlay else [n for n in held if weight_map.get(n) != shard]
            if stray:
                elsewhere = {n: weight_map[n] for n in stray[:5] if n in weight_map}
                places = sorted({str(self.path.parent / s) for s in elsewhere.values()})
                what = (f"also holds {list(elsewhere)}, which the index places in {places}"
                        if elsewhere else f"holds {stray[:5]} that the index does not list")
                raise BackendError(f"checkpoint index {self.path} and its shard {self.path.parent / shard} "
                                   f"disagree: the shard {what}")
            self.entries.update((n, held[n]) for n in names)
        self.entries = {n: self.entries[n] for n in weight_map}  # the index's order
        kinds = {s.kind for s in self._shards.values()}
        self.kind = f"sharded {kinds.pop() if len(kinds) == 1 else 'mixed'}"

    @property
    def safetensors(self) -> bool:
        return all(s.safetensors for s in self._shards.values())

    def describe(self) -> str:
        return f"{self.kind} checkpoint {self.path} ({len(self._shards)} shards)"

    def read(self, name: str) -> torch.Tensor:
        return self._shards[self._of[name]].read(name)

    def map(self, names: list[str], populate: bool = True) -> dict[str, torch.Tensor]:
        """One mapping per shard the names fall in."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(self._of[name], []).append(name)
        mapped = {}
        for shard, group in groups.items():
            mapped.update(self._shards[shard].map(group, populate))
        return {name: mapped[name] for name in names}


class _Object(dict):
    """A JSON object that remembers keys given more than once (json keeps the last silently)."""

    def __init__(self, pairs) -> None:
        super().__init__(pairs)
        seen, self.repeated = set(), []
        for key, _ in pairs:
            if key in seen:
                self.repeated.append(key)
            seen.add(key)


def _weight_map(index: Path) -> tuple[dict[str, str], bool]:
    """The index's weight_map, and whether it is an overlay (module docstring)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_Object)
    except FileNotFoundError:
        raise BackendError(f"checkpoint index {index} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BackendError(f"checkpoint index {index} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BackendError(f"checkpoint index {index} is not valid JSON ({exc}); expected {_FORMAT}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BackendError(f"checkpoint index {index} has no weight_map (or an empty one); expected {_FORMAT}")
    if weight_map.repeated:
        raise BackendError(f"checkpoint index {index} names tensor(s) {weight_map.repeated[:5]} more "
                           "than once in its weight_map; each tensor must map to exactly one shard")
    metadata = data.get("metadata")
    overlay = isinstance(metadata, dict) and metadata.get("overlay") is True
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)
           or not (Path(v).name == v or (overlay and Path(v).is_absolute()))]
    if bad:
        raise BackendError(f"checkpoint index {index}: weight_map entries {bad[:5]} do not name a shard "
                           f"file beside the index; expected {_FORMAT}")
    return dict(weight_map), overlay
