"""The official CosyVoice folders (as FunAudioLLM/CosyVoice2-0.5B and Fun-CosyVoice3-0.5B-2512 are
published): which version a folder holds, which files it needs, which of them planning needs, and
clear errors for a folder that is incomplete, mixes the two versions, or holds a checkpoint that does
not match its yaml.

    cosyvoice2.yaml | cosyvoice3.yaml   hyperparameters (hyperpyyaml; read without executing its tags)
    llm.pt flow.pt hift.pt              fp32 state dicts (torch.load weights_only=True, strict key match)
    CosyVoice-BlankEN/                  Qwen2 config.json + tokenizer (vocab.json, merges.txt); its
                                        model.safetensors is never read (llm.pt holds the LM's weights)
    campplus.onnx                       speaker embedding (CAM++), run by onnxruntime on the CPU
    speech_tokenizer_v2.onnx | _v3.onnx speech tokenizer for voice prompts, onnxruntime on the CPU
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InvalidInputError, ModelNotFoundError

QWEN_DIR = "CosyVoice-BlankEN"
CHECKPOINTS = {"": "llm.pt", "flow": "flow.pt", "hift": "hift.pt"}  # sub-model -> its state dict
SPEAKER_ONNX = "campplus.onnx"


@dataclass(frozen=True)
class Version:
    """One published CosyVoice generation: the files that tell it apart and the classes its yaml builds."""

    name: str  # "cosyvoice2" | "cosyvoice3"
    title: str
    yaml: str
    tokenizer_onnx: str
    classes: tuple[str, ...]  # LM, flow, vocoder classes its yaml builds (hyperpyyaml `!new:` tags)
    published: str

    @property
    def config_files(self) -> tuple[str, ...]:
        """What `plan` needs (fetched first from the hub)."""
        return (self.yaml, f"{QWEN_DIR}/config.json")

    @property
    def required_files(self) -> tuple[str, ...]:
        return (self.yaml, *CHECKPOINTS.values(), f"{QWEN_DIR}/config.json", f"{QWEN_DIR}/vocab.json",
                f"{QWEN_DIR}/merges.txt", SPEAKER_ONNX, self.tokenizer_onnx)

    def builds(self, yaml_text: str) -> list[str]:
        """The classes of this version a yaml text builds (`...generator.HiFTGenerator` is not
        `...CausalHiFTGenerator`: matched after a dot, as a whole name)."""
        return [c for c in self.classes if re.search(rf"\.{c}\b", yaml_text)]


V2 = Version("cosyvoice2", "CosyVoice2", "cosyvoice2.yaml", "speech_tokenizer_v2.onnx",
             ("Qwen2LM", "CausalMaskedDiffWithXvec", "HiFTGenerator"), "FunAudioLLM/CosyVoice2-0.5B")
V3 = Version("cosyvoice3", "CosyVoice3", "cosyvoice3.yaml", "speech_tokenizer_v3.onnx",
             ("CosyVoice3LM", "CausalMaskedDiffWithDiT", "CausalHiFTGenerator"),
             "FunAudioLLM/Fun-CosyVoice3-0.5B-2512")
VERSIONS = (V2, V3)

# CosyVoice2 names, kept for the modules that only read CosyVoice2 files
YAML, V3_YAML, TOKENIZER_ONNX = V2.yaml, V3.yaml, V2.tokenizer_onnx
CONFIG_FILES = V2.config_files
REQUIRED_FILES = V2.required_files


def is_cosyvoice_folder(folder: Path) -> bool:
    """A CosyVoice yaml, or CosyVoice's flow and vocoder files (so a lost yaml is named as missing)."""
    return any((folder / v.yaml).is_file() for v in VERSIONS) or all(
        (folder / name).is_file() for name in ("flow.pt", "hift.pt"))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc}") from None


def detect(folder: Path) -> Version:
    """Which CosyVoice the folder holds, from its files: the yaml's name, the classes the yaml builds
    and the speech tokenizer. A folder that mixes the two versions gets an error naming the files."""
    yamls = [v for v in VERSIONS if (folder / v.yaml).is_file()]
    if len(yamls) > 1:
        raise InvalidInputError(
            f"{folder} mixes CosyVoice versions: it holds both {V2.yaml} and {V3.yaml}; keep the one that "
            f"belongs with its llm.pt, flow.pt and hift.pt")
    if yamls:
        version = yamls[0]
        text = _read(folder / version.yaml)
        for other in VERSIONS:
            foreign = other.builds(text) if other is not version else []
            if foreign:
                raise InvalidInputError(
                    f"{folder / version.yaml} builds {other.title}'s {', '.join(foreign)}: the yaml's name says "
                    f"{version.title}, its classes say {other.title}; rename it to {other.yaml} if the folder "
                    f"is {other.title} ({other.published})")
    else:  # no yaml: the speech tokenizer tells (the missing yaml is then named by check_files)
        present = [v for v in VERSIONS if (folder / v.tokenizer_onnx).is_file()]
        version = present[0] if len(present) == 1 else V2
    for other in VERSIONS:
        if other is not version and (folder / other.tokenizer_onnx).is_file() \
                and not (folder / version.tokenizer_onnx).is_file():
            raise InvalidInputError(
                f"{folder} mixes CosyVoice versions: {version.yaml} is {version.title}'s, but the speech "
                f"tokenizer is {other.tokenizer_onnx} ({other.title}'s); {version.title} needs "
                f"{version.tokenizer_onnx} ({version.published})")
    return version


def check_files(folder: Path, *, config_only: bool = False) -> Version:
    """The folder's version, once every file it needs (``config_only``: those `plan` reads) is
    present; else an error listing each missing one."""
    version = detect(folder)
    needed = version.config_files if config_only else version.required_files
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{version.title} folder {folder} lacks {', '.join(missing)}; a complete folder holds "
            f"{', '.join(version.required_files)} (as {version.published} is published)")
    return version


def weights_present(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINTS.values())


def check_state_dict(path: Path, expected: dict[str, tuple[int, ...]], yaml_name: str = YAML) -> None:
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
        raise InvalidInputError(f"{path} does not match {yaml_name}: {'; '.join(parts)}")
