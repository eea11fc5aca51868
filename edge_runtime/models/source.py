"""Where a model's files come from: a local folder, or a hub id resolved in the local Hugging Face
cache. Never a download unless the caller allows it (`--allow-download`), never one when
HF_HUB_OFFLINE is set, and never weights when only planning: config files are kilobytes, weights
gigabytes, and "will it fit my card?" is answered from the configs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edge_runtime.errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What planning reads: configs (model, generation, processor, tokenizer settings) and the shard
# index, which lists weights without holding any. Matched by huggingface_hub's allow_patterns.
# (fnmatch: "*" crosses folders, so "*.json" also takes dac/config.json)
CONFIG_PATTERNS = ("*.json", "*.yaml", "*.yml", "*.jinja")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def has_weights(folder: Path) -> bool:
    """A single safetensors file, a sharded index whose shards are all present, or a state dict."""
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return not missing_shards(folder)
        except ModelNotFoundError:
            return False
    return any(p.suffix in STATE_DICT_SUFFIXES for p in folder.iterdir() if p.is_file())


def missing_shards(folder: Path) -> list[str]:
    """The shards ``model.safetensors.index.json`` names that ``folder`` lacks (an interrupted
    download); [] without an index. ModelNotFoundError when the index cannot be read."""
    import json

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ModelNotFoundError(f"cannot read the checkpoint index {index}: {exc}") from None
    return [s for s in shards if not (folder / s).is_file()]


def locate(spec: str, allow_download: bool = False, weights: bool = True) -> tuple[Path, bool]:
    """(folder, whether it holds weights). ``weights=False`` needs config files only, and a download
    it is allowed to make fetches nothing else. ModelNotFoundError says where it looked and how to
    get the model otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        folder = check_folder(path)
        return folder, has_weights(folder)
    if not looks_like_hub_id(spec):
        raise ModelNotFoundError(f"model {spec!r} is neither an existing folder nor a Hugging Face hub id "
                                 "(owner/name)")
    folder = _from_hub(spec, allow_download, weights)
    return folder, has_weights(folder)


def _from_hub(spec: str, allow_download: bool, weights: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = None if weights else list(CONFIG_PATTERNS)
    download = allow_download and not offline()
    try:
        folder = Path(snapshot_download(spec, local_files_only=True, allow_patterns=patterns))
        if not any(folder.iterdir()):
            raise LocalEntryNotFoundError(f"{spec}: nothing cached")
    except LocalEntryNotFoundError:
        if not download:
            why = ("HF_HUB_OFFLINE is set" if allow_download and offline()
                   else "downloads are off unless you pass --allow-download")
            needs = ("its config files (" + ", ".join(CONFIG_PATTERNS) + ": kilobytes, no weights)" if not weights
                     else "its config files and weights")
            raise ModelNotFoundError(
                f"{spec} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. This needs "
                f"{needs}. On a connected machine run `hf download {spec}` and copy that cache folder here (or "
                "set HF_HOME), or pass a local folder made with save_pretrained") from None
        try:
            folder = Path(snapshot_download(spec, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - network or hub errors when a download was allowed
            raise ModelNotFoundError(f"could not fetch {spec} from the Hugging Face hub: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry
        raise ModelNotFoundError(f"could not read {spec} from the local Hugging Face cache: {exc}") from None
    return check_folder(folder)


def check_folder(path: Path) -> Path:
    """A folder (which family's files are in it is the registry's question)."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is a file; give the folder save_pretrained wrote")
    return path
