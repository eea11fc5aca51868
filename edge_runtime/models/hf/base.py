"""The shared base of transformers speech models (CSM, Dia, Pocket TTS, ...): find the files, plan,
load through a backend, keep fragile parts fp32, split text, count expensive calls. A family's
adapter (csm.py, dia.py, pocket_tts.py) adds only what differs: its voice-prompt encoding and its
generate() call.

Loading never goes through from_pretrained's weight loading: the skeleton is built from the config
and every tensor comes from model.safetensors through the backend the plan picked (resident,
accelerate, streamer, deepspeed), so offloaded blocks never pass through RAM as a whole model.
"""

from __future__ import annotations

import collections
import logging
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import SpeechModel, SynthesisSettings

log = logging.getLogger(__name__)

# architecture (config.architectures[0]) -> "module:Class" of its adapter, imported on demand
ADAPTERS = {
    "CsmForConditionalGeneration": "csm:CsmSpeechModel",
    "DiaForConditionalGeneration": "dia:DiaSpeechModel",
    "PocketTTSForConditionalGeneration": "pocket_tts:PocketTTSSpeechModel",
}


def read_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or foreign config.json
        raise ModelNotFoundError(f"cannot read {folder / 'config.json'}: {exc}") from None


def adapter_class(config) -> type[HFSpeechModel]:
    """The adapter for this config's architecture; a clear error for any other."""
    import importlib

    arch = (getattr(config, "architectures", None) or [None])[0]
    target = ADAPTERS.get(arch or "")
    if target is None:
        raise InvalidInputError(f"unsupported architecture {arch!r} (model_type {config.model_type!r}); "
                                f"edge_runtime runs {', '.join(sorted(ADAPTERS))}")
    module, name = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


class HFSpeechModel(SpeechModel):
    """A transformers text-to-speech model placed by a backend. Subclasses set the class attributes
    and implement prepare_voice / synthesize_unit."""

    model_class: ClassVar[str]  # transformers class name
    always_fp32: ClassVar[tuple[str, ...]] = ()  # module prefixes that fail in half precision
    supports_voice_prompt = True
    prompt_sample_rate: int

    def __init__(self, model: Any, processor: Any, config: Any, model_id: str, device: torch.device,
                 dtype: torch.dtype, placement: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.placement = placement
        self.calls: collections.Counter[str] = collections.Counter()  # e.g. prompt encodings

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def transformers_class(cls):
        import transformers

        return getattr(transformers, cls.model_class)

    @classmethod
    def fp32_modules(cls, fp32_components=()) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*cls.always_fp32, *fp32_components)))

    @classmethod
    def layout(cls, config, dtype: torch.dtype, fp32_components=()):
        """Components and block sizes on the meta device (the planner's input)."""
        from edge_runtime.policy.planner import layout_from_config

        return layout_from_config(config, cls.transformers_class(), dtype, cls.fp32_modules(fp32_components))

    @classmethod
    def load_processor(cls, folder: Path):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load the processor (tokenizer, feature extractor) from "
                                     f"{folder}: {exc}") from None

    @classmethod
    def load(cls, folder: Path, *, model_id: str, plan: Any, backend: str = "resident",
             device: str = "cpu", dtype: torch.dtype | None = None, fp32_components=(),
             offload_dir: str | None = None) -> HFSpeechModel:
        from edge_runtime.runtime.backends import LoadRequest, load_model

        config = read_config(folder)
        processor = cls.load_processor(folder)
        model_class = cls.transformers_class()
        dtype = dtype or torch.float32

        def build():
            return model_class._from_config(config)

        request = LoadRequest(build=build, checkpoint=folder / "model.safetensors", plan=plan,
                              device=torch.device(device), dtype=dtype,
                              fp32_modules=cls.fp32_modules(fp32_components),
                              offload_dir=Path(offload_dir).expanduser() if offload_dir else None,
                              no_split_modules=tuple(getattr(model_class, "_no_split_modules", None) or ()))
        loaded = load_model(request, backend)
        model = loaded.model.eval()
        if (folder / "generation_config.json").is_file():
            # the skeleton came from config.json only: sampling settings, stop thresholds and
            # special tokens live in generation_config.json and would be silently lost
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        for param in model.parameters():
            param.requires_grad_(False)
        return cls(model, processor, config, model_id, torch.device(device), dtype, placement=loaded)

    def close(self) -> None:
        if self.placement is not None:
            self.placement.close()

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
