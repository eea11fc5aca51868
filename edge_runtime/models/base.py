"""The family protocol: what a model family tells the runtime, and nothing more.

A family is one subclass of SpeechModel, registered with `models.registry.register`. Like
accelerate's ModelHook it is a handful of methods with defaults:

  class level (the family)    resolve(spec)        names only this family understands (piper:NAME)
                              recognises(folder)   from config files alone
                              layout(source, ...)  components and blocks on the meta device, from configs
                              load(source, placer) its sub-models placed by the runtime's backends
  instance (a loaded model)   split_text, synthesize_unit (required); prepare_voice,
                              synthesize_batch, synthesize_with_timings, close (defaults below)

A model may be made of several sub-models with their own checkpoints (a language model, a vocoder,
a codec a processor holds): the layout plans them in one budget and `Placer.place` loads each
through the plan's backend. Families never import the runtime: the placer is handed to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_runtime.errors import InvalidInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edge_runtime.policy.planner import ModelLayout


@dataclass(frozen=True)
class SynthesisSettings:
    """Per-request controls; None means the model's own default."""

    speed: float = 1.0  # > 1 speaks faster (length scale = 1 / speed)
    noise_scale: float | None = None  # variation of the acoustic latent
    noise_w: float | None = None  # variation of phoneme durations
    speaker: str | int | None = None  # multi-speaker models: name or index
    seed: int | None = None  # fixes the noise for reproducible audio
    instructions: str | None = None  # how to speak (OpenAI's field); None for families without it


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, resolved from the user's words before anything is loaded."""

    family: Any  # the SpeechModel subclass that recognised it
    model_id: str
    path: Path  # the model folder, or a family's main file (a Piper .onnx)
    files: dict[str, Path] = field(default_factory=dict)  # named extra files (a Piper voice's JSON)
    weights: bool = True  # False: only config files are present (planning before download)
    allow_download: bool = False  # a family may fetch further config files (a codec's) if True


@dataclass(frozen=True)
class SubModel:
    """One part of a family's model with its own checkpoint. ``name`` is "" for the main part;
    the layout names the blocks of another part "<name>:<module>" so one plan covers them all."""

    name: str
    build: Callable[[], nn.Module]  # the skeleton from configs (run on meta by the backends)
    checkpoint: Path  # .safetensors, a sharded index, a folder, or a torch state dict (.pt)
    fp32_modules: tuple[str, ...] = ()  # module prefixes kept fp32 under half precision
    no_split_modules: tuple[str, ...] = ()  # module classes a device map must not cut
    dtype: Any = None  # torch dtype of its floating weights; None: the placer's (codecs say fp32)
    ignore_keys: tuple[str, ...] = ()  # regexes of checkpoint tensors not in the skeleton (a training-only head)


class Placer(ABC):
    """How a family gets its sub-models placed: implemented by the runtime's loader with the plan
    and backend it resolved (families stay below the runtime layer)."""

    device: torch.device  # execution device
    dtype: torch.dtype  # compute dtype of floating weights
    fp32_components: tuple[str, ...] = ()  # the profile's components kept fp32
    decoder_dtype: torch.dtype | None = None  # an autoregressive LM's weights; None: ``dtype``

    @property
    @abstractmethod
    def offloaded(self) -> bool:
        """True when the plan streams or computes some block away from the execution device."""

    @abstractmethod
    def place(self, part: SubModel) -> nn.Module:
        """The sub-model with every block where the plan says (eval mode, no gradients)."""


@dataclass(frozen=True)
class WordTiming:
    word: str
    start_s: float
    end_s: float
    start_char: int = -1  # [start_char, end_char): the word's span in the request text (-1: unknown)
    end_char: int = -1


class SpeechModel(ABC):
    """A model family (class level) and a loaded model of it (instance level)."""

    # -- the family ---------------------------------------------------------------------------
    family: ClassVar[str] = ""  # registry name ("piper", "csm", ...); set by every family

    @classmethod
    def resolve(cls, spec: str) -> ModelSource | None:
        """A ModelSource for names only this family understands (``piper:NAME``, a ``.onnx``
        file); None to let the registry look for a folder or hub id."""
        return None

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        """Whether the config files in ``folder`` are this family's (weights need not be there)."""
        return False

    @classmethod
    def weights_present(cls, folder: Path) -> bool:
        """Whether ``folder`` holds this family's weights, not only its configs."""
        from edge_runtime.models.source import has_weights

        return has_weights(folder)

    @classmethod
    def require_weights(cls, folder: Path) -> None:
        """Raise ModelNotFoundError, naming what is missing, unless ``folder`` can be loaded."""
        from edge_runtime.errors import ModelNotFoundError
        from edge_runtime.models.source import missing_shards

        if not (folder / "model.safetensors").is_file():
            missing = missing_shards(folder)  # published checkpoints come in 2-10 shards
            if missing:
                raise ModelNotFoundError(
                    f"model folder {folder} lacks {len(missing)} shard(s) model.safetensors.index.json "
                    f"names: {', '.join(missing)}; download them again")
        if not cls.weights_present(folder):
            raise ModelNotFoundError(
                f"model folder {folder} lacks model.safetensors (or model.safetensors.index.json with its "
                f"shards, or the state-dict files the {cls.family} family reads): it holds config files "
                "only; `edge-runtime plan` works on it, loading needs the weights")

    @classmethod
    def config_files(cls) -> tuple[str, ...]:
        """Glob patterns of the files planning needs (fetched before any weight)."""
        return ("*.json",)

    @classmethod
    @abstractmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()
               ) -> ModelLayout:
        """Components and block sizes of every sub-model, from config files alone (meta device)."""

    @classmethod
    @abstractmethod
    def load(cls, source: ModelSource, placer: Placer) -> SpeechModel:
        """Build the skeletons and hand each SubModel to ``placer.place``."""

    @classmethod
    def installed(cls) -> list[dict[str, Any]]:
        """Models of this family usable with no download (for `edge-runtime voices`)."""
        return []

    # -- a loaded model -------------------------------------------------------------------------
    model_id: str
    sample_rate: int
    prompt_sample_rate: int | None = None  # None: voice prompts at sample_rate
    supports_voice_prompt: bool = False
    supports_batch: bool = False  # True when synthesize_batch runs units together (not a loop)
    supports_word_timings: bool = False
    supports_instructions: bool = False  # False: a request's instructions are dropped (OpenAI compatibility)

    @abstractmethod
    def components(self) -> dict[str, Any]:
        """Name -> torch.nn.Module, in execution order (e.g. text_encoder ... decoder)."""

    @abstractmethod
    def split_text(self, text: str) -> list[str]:
        """Units synthesised one after another (sentences); also the streaming granularity."""

    @abstractmethod
    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        """Audio for one unit (float32 mono); with `stream`, in chunks as soon as each is ready."""

    def synthesize_batch(self, units: list[str], settings: SynthesisSettings,
                         voice: Any = None) -> list[np.ndarray]:
        """One audio per unit. The default runs them one by one; a family that batches for real
        overrides it and sets supports_batch."""
        return [np.concatenate(list(self.synthesize_unit(unit, settings, voice)) or [np.zeros(0, np.float32)])
                for unit in units]

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> Any:
        """Clean prompt audio -> a PreparedVoice, computed once per distinct prompt."""
        raise InvalidInputError(f"{self.model_id} does not take voice prompts")

    def synthesize_with_timings(self, unit: str, settings: SynthesisSettings, voice: Any = None
                                ) -> tuple[np.ndarray, list[WordTiming]]:
        """Audio for one unit and when each word is spoken in it."""
        raise InvalidInputError(f"{self.model_id} does not report word timings")

    def check_settings(self, settings: SynthesisSettings) -> None:
        """Raise InvalidInputError for settings this model cannot honour."""

    def speakers(self) -> list[str]:
        return []

    def close(self) -> None:
        """Release what the model holds beyond its placed weights (the placer's handles are the
        runtime's to close)."""

    def describe(self) -> dict[str, Any]:
        """Facts for `voices`, `doctor` and the server's model list."""
        return {"id": self.model_id, "family": self.family, "sample_rate": self.sample_rate,
                "voice_prompt": self.supports_voice_prompt, "speakers": self.speakers()}
