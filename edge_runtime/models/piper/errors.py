"""The one error a Piper voice load raises for problems with the voice files."""

from __future__ import annotations

from edge_runtime.errors import EdgeRuntimeError


class VoiceLoadError(EdgeRuntimeError, ValueError):
    """A voice's .onnx / .onnx.json is missing, unreadable or inconsistent; the message names the file."""
