"""Where a transformers speech model's files come from: a local folder, or a hub id resolved in
the local Hugging Face cache. Never a download unless the caller allows it (`--allow-download`),
and never one when HF_HUB_OFFLINE is set."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edge_runtime.errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS = ("model.safetensors",)


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate(spec: str, allow_download: bool = False) -> Path:
    """A folder holding the model's config, weights and processor files; ModelNotFoundError saying
    where it looked and how to get the model otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        return check_folder(path)
    if not looks_like_hub_id(spec):
        raise ModelNotFoundError(f"model {spec!r} is neither an existing folder nor a Hugging Face hub id "
                                 "(owner/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    download = allow_download and not offline()
    try:
        folder = snapshot_download(spec, local_files_only=not download)
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if allow_download and offline()
               else "downloads are off unless you pass --allow-download")
        raise ModelNotFoundError(
            f"{spec} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. On a "
            f"connected machine run `hf download {spec}` and copy that cache folder here (or set HF_HOME), "
            "or pass a local folder made with save_pretrained") from None
    except Exception as exc:  # noqa: BLE001 - network or hub errors when a download was allowed
        raise ModelNotFoundError(f"could not fetch {spec} from the Hugging Face hub: {exc}") from None
    return check_folder(Path(folder))


def check_folder(path: Path) -> Path:
    """The folder has what loading needs: config.json and one safetensors weight file."""
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is a file; give the folder save_pretrained wrote")
    missing = [name for name in ("config.json", *WEIGHTS) if not (path / name).is_file()]
    if missing:
        sharded = (path / "model.safetensors.index.json").is_file()
        hint = (" (sharded checkpoints are not supported yet: merge them into one model.safetensors)"
                if sharded else "")
        raise ModelNotFoundError(f"model folder {path} lacks {', '.join(missing)}{hint}; it should hold "
                                 "what save_pretrained writes: config.json, model.safetensors and the "
                                 "processor files")
    return path
