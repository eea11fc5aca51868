"""The shared base of transformers speech families (CSM, Dia, Pocket TTS, ...): recognise a folder by
its config.json, describe the layout from configs, load every sub-model through the runtime's placer,
keep fragile parts fp32, split text, count expensive calls. A family's file adds only what differs:
its layout's annotations, the codec a processor holds (a sub-model of its own), its voice-prompt
encoding and its generate() call.

Loading never goes through from_pretrained's weight loading: skeletons are built from configs and
every tensor comes from the checkpoints through the backend the plan picked (resident, accelerate,
streamer, deepspeed), so offloaded blocks never pass through RAM as a whole model.
"""

from __future__ import annotations

import collections
import json
import logging
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import ModelSource, Placer, SpeechModel, SubModel, SynthesisSettings

log = logging.getLogger(__name__)


def read_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or foreign config.json
        raise ModelNotFoundError(f"cannot read {folder / 'config.json'}: {exc}") from None


def architecture(folder: Path) -> str | None:
    """config.json's architectures[0], read as JSON (no transformers import, no validation)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = config.get("architectures") if isinstance(config, dict) else None
    return names[0] if isinstance(names, list) and names else None


def codec_folder(source: ModelSource, subfolder: str, label: str = "codec") -> Path:
    """The folder of the codec a processor holds: where processor_config.json points (a path
    relative to the model folder, an absolute path, or a hub id, resolved like the model itself:
    config files only when planning), else our ``subfolder`` beside the model's files."""
    from edge_runtime.models.source import locate, looks_like_hub_id

    folder = source.path
    try:
        settings = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
        name = str((settings.get("audio_tokenizer") or {}).get("audio_tokenizer_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        name = ""
    candidates = [Path(name).expanduser() if Path(name).is_absolute() else folder / name] if name else []
    candidates.append(folder / subfolder)
    for candidate in candidates:
        if (candidate / "config.json").is_file() and candidate.resolve() != folder.resolve():
            return candidate
    if name and looks_like_hub_id(name):
        return locate(name, source.allow_download, weights=source.weights)[0]
    raise ModelNotFoundError(f"the {label} of {source.model_id} was not found: {folder / 'processor_config.json'} "
                             f"names {name or 'none'!r} and {folder / subfolder} does not exist; put the codec's "
                             "save_pretrained files (config.json, model.safetensors) there")


class HFSpeechModel(SpeechModel):
    """A transformers text-to-speech model placed by a backend. Subclasses set the class attributes
    and implement prepare_voice / synthesize_unit; those whose processor holds a codec add it in
    codec_part()."""

    model_class: ClassVar[str]  # transformers class name (config.json's architectures[0])
    always_fp32: ClassVar[tuple[str, ...]] = ()  # module prefixes that fail in half precision
    supports_voice_prompt = True

    def __init__(self, model: Any, processor: Any, config: Any, model_id: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.calls: collections.Counter[str] = collections.Counter()  # e.g. prompt encodings

    # -- the family ----------------------------------------------------------------------------
    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return architecture(folder) == cls.model_class

    @classmethod
    def transformers_class(cls):
        import transformers

        return getattr(transformers, cls.model_class)

    @classmethod
    def fp32_modules(cls, fp32_components=()) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*cls.always_fp32, *fp32_components)))

    @classmethod
    def model_layout(cls, config, dtype: torch.dtype, fp32_components=()):
        """The main model's layout from its config (the generic split unless a family refines it)."""
        from edge_runtime.policy.planner import layout_from_config

        return layout_from_config(config, cls.transformers_class(), dtype, cls.fp32_modules(fp32_components))

    @classmethod
    def codec_part(cls, source: ModelSource, config) -> tuple[SubModel, Any] | None:
        """The codec the processor holds, as a sub-model with its own checkpoint, and its layout
        builder (dtype -> ModelLayout); None when the model holds its codec itself."""
        return None

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        config = read_config(source.path)
        layout = cls.model_layout(config, dtype, fp32_components)
        codec = cls.codec_part(source, config)
        if codec is not None:
            part, describe = codec
            layout = layout.with_submodel(part.name, describe(dtype))
        return layout

    @classmethod
    def main_part(cls, source: ModelSource, config, fp32_components=()) -> SubModel:
        model_class = cls.transformers_class()
        return SubModel(name="", build=lambda: model_class._from_config(config), checkpoint=source.path,
                        fp32_modules=cls.fp32_modules(fp32_components),
                        no_split_modules=tuple(getattr(model_class, "_no_split_modules", None) or ()),
                        # what transformers' from_pretrained skips in published checkpoints (Higgs's
                        # training-only text head), our backends skip too
                        ignore_keys=tuple(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ()))

    @classmethod
    def load_processor(cls, folder: Path, codec: Any = None):
        """The processor; ``codec`` is the placed codec sub-model for families that have one."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load the processor (tokenizer, feature extractor) from "
                                     f"{folder}: {exc}") from None

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> HFSpeechModel:
        folder = source.path
        config = read_config(folder)
        codec_spec = cls.codec_part(source, config)
        codec = placer.place(codec_spec[0]) if codec_spec is not None else None
        processor = cls.load_processor(folder, codec)
        model = placer.place(cls.main_part(source, config, placer.fp32_components))
        if (folder / "generation_config.json").is_file():
            # the skeleton came from config.json only: sampling settings, stop thresholds and
            # special tokens live in generation_config.json and would be silently lost
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, config, source.model_id, placer.device, placer.dtype)

    # -- text --------------------------------------------------------------------------------
    def split_text(self, text: str) -> list[str]:
        from edge_runtime.models.text import normalize_text, split_sentences

        return split_sentences(normalize_text(text), 300)

    def check_settings(self, settings: SynthesisSettings) -> None:
        if settings.speaker not in (None, 0, "0"):
            raise InvalidInputError(f"{self.model_id} has no built-in speakers; clone a voice with a "
                                    "voice prompt instead of --speaker")

    # -- what a family adds -------------------------------------------------------------------
    @abstractmethod
    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None):
        """Clean prompt audio (mono float32 at prompt_sample_rate) -> PreparedVoice: the encoded
        prompt (codec codes / latents) the model consumes, computed once per distinct prompt."""

    @abstractmethod
    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        """One sentence -> float32 mono audio at sample_rate."""

    def generator(self, settings: SynthesisSettings) -> None:
        """Seed the sampler when the request asks for reproducible audio."""
        if settings.seed is not None:
            torch.manual_seed(int(settings.seed))
