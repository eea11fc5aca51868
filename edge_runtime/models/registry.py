"""Registered model families, and a user's model name -> the ModelSource of the family that owns it.

Families register themselves (`@register`). Built-in families are imported on first use; other
packages add theirs through the entry-point group ``edge_runtime.families`` (installed plug-ins)
or the ``EDGE_RUNTIME_FAMILIES`` variable (comma-separated module names, imported for their
``@register``), so a new family needs no edit here.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import ModelSource, SpeechModel

DEFAULT_MODEL = "piper:en_US-joe-medium"
BUILTIN = ("edge_runtime.models.piper.adapter", "edge_runtime.models.hf.csm", "edge_runtime.models.hf.dia",
           "edge_runtime.models.hf.pocket_tts", "edge_runtime.models.cosyvoice.family",
           "edge_runtime.models.higgs_audio_v2", "edge_runtime.models.vibevoice.family")
ENTRY_POINT_GROUP = "edge_runtime.families"
PLUGIN_ENV = "EDGE_RUNTIME_FAMILIES"

_families: list[type[SpeechModel]] = []
_loaded = False
_lock = threading.Lock()


def register(family: type[SpeechModel]) -> type[SpeechModel]:
    """Class decorator: make ``family`` known to resolve(), plan and load."""
    if not family.family:
        raise TypeError(f"{family.__name__} must set the class attribute `family` (its registry name)")
    for i, known in enumerate(_families):
        if known.family == family.family:
            _families[i] = family  # re-registration (a reloaded module) replaces
            return family
    _families.append(family)
    return family


def families() -> list[type[SpeechModel]]:
    """Every registered family: built-ins, installed plug-ins, and modules named in the variable."""
    global _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            for module in BUILTIN:
                importlib.import_module(module)
            _load_plugins()
    return list(_families)


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()  # a family class, or a module registering its families on import
        if isinstance(loaded, type):
            register(loaded)
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ModelNotFoundError(f"{PLUGIN_ENV} names module {name!r}, which cannot be imported: {exc}") from None


def by_name(name: str) -> type[SpeechModel]:
    for family in families():
        if family.family == name:
            return family
    raise ModelNotFoundError(f"no model family {name!r}; registered: {', '.join(f.family for f in families())}")


def resolve(spec: str | None, allow_download: bool = False, weights: bool = True) -> ModelSource:
    """The ModelSource for ``spec``: a name a family understands (``piper:NAME``, a ``.onnx``
    voice), a model folder, or a Hugging Face hub id in the local cache (fetched only with
    ``allow_download``). ``weights=False`` asks only for config files: enough to plan."""
    from edge_runtime.models.source import locate, looks_like_hub_id

    spec = spec or DEFAULT_MODEL
    for family in families():
        found = family.resolve(spec)
        if found is not None:
            return found
    path = Path(spec).expanduser()
    if path.exists() or looks_like_hub_id(spec):
        folder, complete = locate(spec, allow_download, weights=weights)
        family = recognise(folder)
        if weights:
            family.require_weights(folder)
        return ModelSource(family, spec, folder, weights=complete, allow_download=allow_download)
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        raise ModelNotFoundError(f"model path {path} does not exist")
    raise ModelNotFoundError(
        f"unknown model {spec!r}: expected 'piper:NAME', a path to a Piper .onnx voice, a model folder "
        f"or a Hugging Face hub id such as sesame/csm-1b (default {DEFAULT_MODEL})")


def recognise(folder: Path) -> type[SpeechModel]:
    """The family whose config files these are; a clear error naming what was found otherwise."""
    for family in families():
        if family.recognises(folder):
            return family
    config = folder / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"model folder {folder} has no config.json, and no registered family "
                                 f"({', '.join(f.family for f in families())}) recognises its files")
    try:
        found = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read {config}: {exc}") from None
    arch = (found.get("architectures") or [None])[0] if isinstance(found, dict) else None
    kind = found.get("model_type") if isinstance(found, dict) else None
    raise InvalidInputError(f"unsupported architecture {arch!r} (model_type {kind!r}) in {config}; edge_runtime "
                            f"runs the families {', '.join(f.family for f in families())}")


def installed() -> list[dict[str, Any]]:
    """Every model this machine can load without a download."""
    return [entry for family in families() for entry in family.installed()]
