"""Load a Piper voice as PiperVits, converting its .onnx once and caching the weights as safetensors.

The cache file is keyed by the ONNX file's sha256 (so a replaced voice file never reuses stale
weights) and carries the hyperparameters as JSON in its header, so later loads need neither the
`onnx` package nor the graph. Hashing 60+ MB on every start would cost ~0.1 s, so hashes are
remembered in a small index keyed by path, size and mtime. Every write is tmp-file + rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path


from edge_runtime.models.piper.config import PiperVoiceConfig, VitsHyperParams
from edge_runtime.models.piper.errors import VoiceLoadError
from edge_runtime.models.piper.vits import PiperVits, skip_weight_init
from edge_runtime.paths import atomic_write

log = logging.getLogger(__name__)

FORMAT = "edge_runtime.piper.v1"  # bump when the cached layout or module names change
_INDEX = "sha256_index.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else the user cache dir ($EDGE_RUNTIME_CACHE_DIR, else $XDG_CACHE_HOME/edge_runtime)."""
    from edge_runtime.paths import cache_dir as user_cache_dir

    return Path(cache_dir) if cache_dir is not None else user_cache_dir()





def file_sha256(path: Path, folder: Path) -> str:
    """sha256 of `path`, remembered in `folder`'s index while the file's size and mtime stay the same."""
    stat = path.stat()
    key = str(path.resolve())
    index_path = folder / _INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    try:
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    except OSError as exc:  # a read-only cache still works, it just rehashes next time
        log.debug("could not update %s: %s", index_path, exc)
    return index[key]["sha256"]


def _read_cached(path: Path, source: Path) -> PiperVits | None:
    """The model from a cached safetensors file, or None when it is absent, stale or damaged."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    from edge_runtime.models.piper.onnx_import import load_state  # load_state lives beside convert; importing it does not load onnx

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None
            hp = VitsHyperParams.from_json(meta["hparams"])
            state = {name: f.get_tensor(name) for name in f.keys()}
        with skip_weight_init():
            model = PiperVits(hp)
        load_state(model, state, source)
        return model.eval()
    except Exception as exc:  # noqa: BLE001 - the cache is disposable: any damage means convert again
        log.warning("ignoring damaged weight cache %s (%s); converting %s again", path, exc, source)
        return None


def load_piper_voice(onnx_path: str | Path, json_path: str | Path | None = None,
                     cache_dir: str | Path | None = None, mode: str = "fast") -> tuple[PiperVits, PiperVoiceConfig]:
    """A Piper voice as (PiperVits ready for inference in `mode`, its config).

    Raises VoiceLoadError naming the file and the problem.
    """
    onnx_path = Path(onnx_path)
    json_path = Path(json_path) if json_path is not None else onnx_path.with_name(onnx_path.name + ".json")
    if not onnx_path.is_file():
        raise VoiceLoadError(f"voice model {onnx_path} does not exist")
    config = PiperVoiceConfig.from_json(json_path)
    folder = cache_root(cache_dir) / "piper"
    sha = file_sha256(onnx_path, folder)
    cached = folder / f"{sha}.safetensors"
    model = _read_cached(cached, onnx_path)
    if model is None:
        from edge_runtime.models.piper.onnx_import import convert

        model, hp = convert(onnx_path)
        config.check_against(hp, json_path)  # before caching: a mismatched pair must fail every time
        _save(model, hp, cached, onnx_path)
    else:
        config.check_against(model.hparams, json_path)
    return model.prepare_for_inference(mode), config


def _save(model: PiperVits, hp: VitsHyperParams, path: Path, source: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "hparams": hp.to_json(), "source": source.name}
    try:
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    except OSError as exc:
        log.warning("could not cache converted weights at %s (%s); the next load converts again", path, exc)


def cached_weights(onnx_path: str | Path, json_path: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> tuple[Path, PiperVoiceConfig, VitsHyperParams]:
    """The voice's safetensors weight file (converting the ONNX once if needed), its config and
    hyperparameters: what the offload backends load from, block by block, without first building
    the whole model in memory."""
    from safetensors import safe_open

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise VoiceLoadError(f"voice model {onnx_path} does not exist")
    folder = cache_root(cache_dir) / "piper"
    path = folder / f"{file_sha256(onnx_path, folder)}.safetensors"
    for attempt in range(2):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") == FORMAT:
                break
        except Exception:  # noqa: BLE001 - absent or damaged: (re)convert below
            pass
        if attempt:
            raise VoiceLoadError(f"cannot cache the weights of {onnx_path} at {path} (is the cache "
                                 "folder writable? set EDGE_RUNTIME_CACHE_DIR)")
        load_piper_voice(onnx_path, json_path, cache_dir, mode="eager")  # converts and caches
    hp = VitsHyperParams.from_json(meta["hparams"])
    json_path = Path(json_path) if json_path is not None else onnx_path.with_name(onnx_path.name + ".json")
    config = PiperVoiceConfig.from_json(json_path)
    config.check_against(hp, json_path)
    return path, config, hp
