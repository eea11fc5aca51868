"""A model family defined in this one module, registered on import (or through EDGE_RUNTIME_FAMILIES
for a subprocess): a tiny text-to-speech model made of three sub-models in three formats.

  ""        the LM: sharded safetensors (lm/model.safetensors.index.json + shards). Byte embedding,
            residual MLP blocks and a head, run once per generated frame (autoregressive).
  vocoder   a torch.save'd state dict (vocoder.pt): latents -> waveform, once per sentence.
  codec     held by the processor (codec/config.json + codec/model.safetensors): encodes a voice
            prompt into a speaker vector the LM adds at every step.

Nothing else in the project names it: the runtime plans, places, serves and streams it as it does
any family.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.models.base import ModelSource, Placer, SpeechModel, SubModel, SynthesisSettings
from edge_runtime.models.registry import register
from edge_runtime.prepared_voice import PreparedVoice


@dataclass(frozen=True)
class ToyConfig:
    model_type: str = "toy_tts"
    hidden: int = 32
    layers: int = 3
    latent: int = 8
    hop: int = 80  # samples per frame
    sample_rate: int = 16000
    frames_per_char: int = 2
    max_frames: int = 48


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class ToyLM(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.embed, self.latent_in = nn.Embedding(256, cfg.hidden), nn.Linear(cfg.latent, cfg.hidden)
        self.layers = nn.ModuleList(Layer(cfg.hidden) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.hidden, cfg.latent)

    def forward(self, text_ids: torch.Tensor, previous: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        h = self.embed(text_ids).mean(dim=1) + self.latent_in(previous) + speaker
        for layer in self.layers:
            h = layer(h)
        return torch.tanh(self.head(h))


class ToyVocoder(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.smooth = nn.Conv1d(cfg.latent, 64, 3, padding=1)
        self.mix = nn.Conv1d(64, 64, 9, padding=4)  # the bulk of the vocoder's weights
        self.up = nn.ConvTranspose1d(64, 1, kernel_size=cfg.hop, stride=cfg.hop)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # (batch, latent, frames) -> (batch, samples)
        h = torch.tanh(self.smooth(latents))
        return torch.tanh(self.up(torch.tanh(self.mix(h)) + h)).squeeze(1)


class ToyCodec(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.hop = cfg.hop
        self.encode, self.project = nn.Linear(cfg.hop, 16), nn.Linear(16, cfg.hidden)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # mono samples -> speaker vector
        frames = audio[: len(audio) // self.hop * self.hop].view(-1, self.hop)
        return self.project(torch.tanh(self.encode(frames)).mean(dim=0))


class ToyProcessor:
    """Text to byte ids, and the codec it holds for voice prompts (as transformers' processors do)."""

    def __init__(self, codec: nn.Module) -> None:
        self.codec = codec

    @staticmethod
    def text_ids(text: str) -> torch.Tensor:
        return torch.tensor([list(text.encode("utf-8"))[:200] or [32]], dtype=torch.long)


def read_config(folder: Path) -> ToyConfig:
    return ToyConfig(**json.loads((folder / "config.json").read_text()))


@register
class ToyTTS(SpeechModel):
    family = "toy_tts"
    supports_voice_prompt = True

    def __init__(self, cfg: ToyConfig, lm: nn.Module, vocoder: nn.Module, processor: ToyProcessor,
                 model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.lm, self.vocoder, self.processor = cfg, lm, vocoder, processor
        self.model_id, self.device, self.dtype, self.sample_rate = model_id, device, dtype, cfg.sample_rate

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        try:
            return read_config(folder).model_type == cls.family
        except (OSError, ValueError, TypeError):
            return False

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        from edge_runtime.policy.planner import describe_model

        cfg = read_config(source.path)
        with torch.device("meta"):
            lm, vocoder, codec = ToyLM(cfg), ToyVocoder(cfg), ToyCodec(cfg)
        parts = {"embeddings": [lm.embed, lm.latent_in], "layers": list(lm.layers), "head": lm.head}
        main = describe_model(lm, parts, set(parts), dtype, fp32_components).with_hints(
            tokens_per_char=cfg.frames_per_char, max_positions=cfg.max_frames)
        stages = {"vocoder": [vocoder.smooth, vocoder.mix, vocoder.up]}
        return (main.with_submodel("vocoder", describe_model(vocoder, stages, (), dtype))
                .with_submodel("codec", describe_model(codec, {"codec": codec}, (), dtype, ("codec",))))

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> ToyTTS:
        cfg, folder = read_config(source.path), source.path
        lm = placer.place(SubModel("", lambda: ToyLM(cfg), folder / "lm" / "model.safetensors.index.json"))
        vocoder = placer.place(SubModel("vocoder", lambda: ToyVocoder(cfg), folder / "vocoder.pt"))
        codec = placer.place(SubModel("codec", lambda: ToyCodec(cfg), folder / "codec", dtype=torch.float32))
        return cls(cfg, lm, vocoder, ToyProcessor(codec), source.model_id, placer.device, placer.dtype)

    def components(self) -> dict[str, Any]:
        return {"lm": self.lm, "vocoder": self.vocoder, "codec": self.processor.codec}

    def split_text(self, text: str) -> list[str]:
        from edge_runtime.models.text import normalize_text, split_sentences

        return split_sentences(normalize_text(text))

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> PreparedVoice:
        with torch.inference_mode():
            speaker = self.processor.codec(torch.as_tensor(audio, dtype=torch.float32, device=self.device))
        return PreparedVoice(tensors={"speaker": speaker.cpu()}, model_id=self.model_id, sample_rate=sample_rate,
                             transcript=transcript)

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        ids = self.processor.text_ids(unit).to(self.device)
        speaker = torch.zeros(1, self.cfg.hidden) if voice is None else voice.tensors["speaker"].view(1, -1)
        speaker = speaker.to(self.device, self.dtype)
        latent = torch.zeros(1, self.cfg.latent, device=self.device, dtype=self.dtype)
        frames = []
        for _ in range(min(self.cfg.max_frames, len(unit) * self.cfg.frames_per_char)):
            latent = self.lm(ids, latent, speaker)  # one forward per frame: the AR loop
            frames.append(latent)
        audio = self.vocoder(torch.stack(frames, dim=2))
        yield audio.reshape(-1).float().cpu().numpy()


def build_toy(folder: Path, seed: int = 0) -> Path:
    """Random weights in the three formats, and the configs."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    folder, cfg = Path(folder), ToyConfig()
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(cfg)))
    (folder / "lm").mkdir()
    save_torch_state_dict(ToyLM(cfg).state_dict(), folder / "lm", max_shard_size=12_000)  # several shards
    torch.save(ToyVocoder(cfg).state_dict(), folder / "vocoder.pt")
    (folder / "codec").mkdir()
    (folder / "codec" / "config.json").write_text(json.dumps({"model_type": "toy_codec", "hop": cfg.hop}))
    save_file(ToyCodec(cfg).state_dict(), str(folder / "codec" / "model.safetensors"))
    return folder
