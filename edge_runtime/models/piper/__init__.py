"""Piper voices (VITS) in PyTorch, numerically matching Piper's ONNX graphs.

    from edge_runtime.models.piper import load_piper_voice
    model, config = load_piper_voice("en_US-joe-medium.onnx")   # PiperVits, PiperVoiceConfig
    audio, lengths = model(ids, id_lengths, noise_scale=0.667, length_scale=1.0, noise_w=0.8)

Config and errors import without torch; the model code loads on first use (cold start).
"""

from __future__ import annotations

from typing import Any

from edge_runtime.models.piper.config import PiperVoiceConfig, VitsHyperParams
from edge_runtime.models.piper.errors import VoiceLoadError

__all__ = ["PiperVoiceConfig", "VitsHyperParams", "VoiceLoadError", "PiperVits", "load_piper_voice"]


def __getattr__(name: str) -> Any:
    if name == "PiperVits":
        from edge_runtime.models.piper.vits import PiperVits

        return PiperVits
    if name == "load_piper_voice":
        from edge_runtime.models.piper.weights_cache import load_piper_voice

        return load_piper_voice
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
