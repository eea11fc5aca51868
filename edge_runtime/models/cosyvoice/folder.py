"""The official CosyVoice2 folder (as FunAudioLLM/CosyVoice2-0.5B is published): which files it holds,
which of them planning needs, and clear errors for a folder that is incomplete, of another version,
or holds a checkpoint that does not match its yaml.

    cosyvoice2.yaml            hyperparameters (hyperpyyaml; read without executing its tags)
    llm.pt flow.pt hift.pt     fp32 state dicts (torch.load weights_only=True, strict key match)
    CosyVoice-BlankEN/         Qwen2 config.json + tokenizer (vocab.json, merges.txt); its
                               model.safetensors is never read (llm.pt holds the LM's weights)
    campplus.onnx              speaker embedding (CAM++), run by onnxruntime on the CPU
    speech_tokenizer_v2.onnx   speech tokenizer for voice prompts, onnxruntime on the CPU
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import InvalidInputError, ModelNotFoundError

YAML = "cosyvoice2.yaml"
V3_YAML = "cosyvoice3.yaml"
QWEN_DIR = "CosyVoice-BlankEN"
CHECKPOINTS = {"": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}  # sub-model -> its state dict
SPEAKER_ONNX = "campplus.onnx"
TOKENIZER_ONNX = "speech_tokenizer_v2.onnx"
# What `plan` needs (fetched first from the hub), and what loading needs besides.
CONFIG_FILES = (YAML, f"{QWEN_DIR}/config.json")
REQUIRED_FILES = (YAML, *CHECKPOINTS.values(), f"{QWEN_DIR}/config.json", f"{QWEN_DIR}/vocab.json",
                  f"{QWEN_DIR}/merges.txt", SPEAKER_ONNX, TOKENIZER_ONNX)
# Class names only a CosyVoice3 yaml builds (its LM, its DiT flow, its causal vocoder).
V3_MARKERS = ("CosyVoice3LM", "CausalMaskedDiffWithDiT", "CausalHiFTGenerator")


def is_cosyvoice_folder(folder: Path) -> bool:
    """A CosyVoice yaml, or CosyVoice's flow and vocoder files (so a lost yaml is named as missing)."""
    return any((folder / name).is_file() for name in (YAML, V3_YAML)) or all(
        (folder / name).is_file() for name in ("flow.pt", "hift.pt"))


def check_version(folder: Path) -> None:
    """A CosyVoice3 folder (or a yaml that builds CosyVoice3's classes) is refused by name."""
    yaml_path = folder / YAML
    text = ""
    if yaml_path.is_file():
        try:
            text = yaml_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelNotFoundError(f"cannot read {yaml_path}: {exc}") from None
    found = [m for m in V3_MARKERS if m in text]
    if not yaml_path.is_file() and (folder / V3_YAML).is_file() or found:
        what = f"its yaml builds {', '.join(found)}" if found else f"it holds {V3_YAML}, not {YAML}"
        raise InvalidInputError(
            f"{folder} is a CosyVoice3 folder ({what}); the cosyvoice2 family reads CosyVoice2 folders "
            f"(CosyVoice2-0.5B: {YAML}). CosyVoice3 has another LM vocabulary, a DiT flow and a causal vocoder.")


def check_files(folder: Path, names: tuple[str, ...] = REQUIRED_FILES) -> None:
    """Every file in ``names`` is present, or an error listing each missing one."""
    check_version(folder)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"CosyVoice2 folder {folder} lacks {', '.join(missing)}; a complete folder holds "
            f"{', '.join(REQUIRED_FILES)} (as FunAudioLLM/CosyVoice2-0.5B is published)")


def weights_present(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINTS.values())


def check_state_dict(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """``path`` is a readable state dict with exactly the keys and shapes of ``expected`` (the
    skeleton's, built from the yaml): upstream loads with strict=True, and so do we, with an error
    that names the file and the first differences instead of a traceback."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{path} is not a readable PyTorch state dict ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInputError(f"{path} does not hold a state dict (name -> tensor)")
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k] != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {list(found[k])}, the yaml gives "
                         f"{list(expected[k])})")
        raise InvalidInputError(f"{path} does not match {YAML}: {'; '.join(parts)}")
