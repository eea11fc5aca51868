"""Pocket TTS (transformers' PocketTTSForConditionalGeneration): a causal transformer over the
voice prompt's latents, the text and the generated latents, with a flow head sampling one
continuous latent per audio frame.

Its audio tokenizer (the codec that encodes the prompt into latents and decodes generated latents
into 24 kHz audio) is not a submodule of the model: it is a separate PocketTTSAudioTokenizerModel
the processor holds, with its own weights. So it is not in model.safetensors nor in the plan; it
stays resident on the execution device in fp32 (small: ~20M parameters at the released size).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.models.base import SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel
from edge_runtime.models.hf.source import locate, looks_like_hub_id

CODEC_SUBFOLDER = "audio_tokenizer"  # where our folders keep the codec: next to the model's files
_PROCESSOR_OPTIONS = ("short_text_max_words", "frames_after_eos_short_text", "frames_after_eos", "fade_in_duration")


@functools.cache
def _inference_class():
    """PocketTTSForConditionalGeneration whose training-only loss weighting holds buffers, not
    parameters. Released checkpoints lack it (transformers ignores it when missing) while
    save_pretrained writes it; as buffers (zero, as transformers initialises it) it loads from
    either, since our loaders require every *parameter* from the checkpoint."""
    from transformers import PocketTTSForConditionalGeneration

    class PocketTTSForInference(PocketTTSForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            for module in self.loss_weighting.modules():
                for name, param in list(module._parameters.items()):
                    del module._parameters[name]
                    module.register_buffer(name, torch.zeros(param.shape, dtype=param.dtype))

    return PocketTTSForInference


class PocketTTSSpeechModel(HFSpeechModel):
    model_class = "PocketTTSForConditionalGeneration"
    # transformers keeps these fp32 under bf16/fp16 (_keep_in_fp32_modules_strict): the latent
    # statistics and the flow-time frequencies. The codec is fp32 too, outside the model (see top).
    always_fp32 = ("latent_mean", "latent_std", "flow_head.timestep_embeddings.0.freqs",
                   "flow_head.timestep_embeddings.1.freqs")
    sample_rate = 24000
    prompt_sample_rate = 24000

    def __init__(self, model: Any, processor: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, processor, config, *args, **kwargs)
        self.codec = processor.audio_tokenizer.to(self.device, torch.float32).eval()
        for param in self.codec.parameters():
            param.requires_grad_(False)
        self.sample_rate = int(self.codec.config.sampling_rate)
        self.prompt_sample_rate = int(processor.feature_extractor.sampling_rate)
        tokenizer = processor.tokenizer
        self._placeholders = [t for t in (processor.audio_prompt_bos_token, processor.audio_token,
                                          processor.audio_latent_token, processor.audio_bos_token) if t]
        self._placeholder_ids = set(tokenizer.convert_tokens_to_ids(self._placeholders))

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def transformers_class(cls):
        return _inference_class()

    @classmethod
    def layout(cls, config, dtype: torch.dtype, fp32_components=()):
        from edge_runtime.policy.planner import layout_from_config

        # the planner's builder is registered under the transformers class (same module names)
        return layout_from_config(config, super().transformers_class(), dtype, cls.fp32_modules(fp32_components))

    @classmethod
    def load_processor(cls, folder: Path):
        """Feature extractor and tokenizer from the folder, the codec from where processor_config.json
        points. transformers would resolve a relative codec path against the working directory, so
        the processor is assembled here instead of by AutoProcessor."""
        from transformers import (AutoFeatureExtractor, AutoTokenizer, PocketTTSAudioTokenizerModel,
                                  PocketTTSProcessor)

        try:
            settings = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
            codec_dir = _codec_folder(folder, settings.get("audio_tokenizer") or {})
            codec = PocketTTSAudioTokenizerModel.from_pretrained(codec_dir, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            template = folder / "chat_template.jinja"
            return PocketTTSProcessor(
                AutoFeatureExtractor.from_pretrained(folder, local_files_only=True), tokenizer,
                audio_tokenizer=codec,
                chat_template=(template.read_text(encoding="utf-8") if template.is_file()
                               else settings.get("chat_template") or tokenizer.chat_template),
                **{k: settings[k] for k in _PROCESSOR_OPTIONS if k in settings})
        except ModelNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load the Pocket TTS processor (tokenizer, feature extractor, "
                                     f"audio tokenizer) from {folder}: {exc}") from None

    def components(self) -> dict[str, Any]:
        backbone = self.model.model
        return {"embeddings": backbone.embed_tokens, "decoder": backbone.layers,
                "flow_head": self.model.flow_head, "audio_tokenizer": self.codec}

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0:
            raise InvalidInputError("Pocket TTS has no speaking-rate control; leave speed at 1.0")
        if settings.noise_w is not None:
            raise InvalidInputError("Pocket TTS has no duration model, so noise_w does not apply; "
                                    "noise_scale sets its sampling temperature")

    # -- voice prompt ------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> PreparedVoice:
        """Prompt audio -> its codec latents (frames x latent_dim), encoded once here; Pocket TTS
        reads no transcript (kept for the record only)."""
        if sample_rate != self.prompt_sample_rate:
            raise InvalidInputError(f"voice prompt at {sample_rate} Hz; Pocket TTS takes {self.prompt_sample_rate} Hz")
        features = self.processor.feature_extractor(audio, sampling_rate=sample_rate, return_tensors="pt")
        with torch.inference_mode():
            encoded = self.codec.encode(features["input_values"].to(self.device, torch.float32),
                                        features["padding_mask"].to(self.device))
        self.calls["encode_prompt"] += 1
        latents = encoded.latents[0][encoded.latents_mask[0].bool()].float().cpu()
        return PreparedVoice(tensors={"audio_prompt_latents": latents}, model_id=self.model_id,
                             sample_rate=sample_rate, transcript=transcript,
                             extra={"frames": int(latents.shape[0]), "frame_rate": float(self.config.frame_rate)})

    # -- synthesis ---------------------------------------------------------------------------
    def _inputs(self, unit: str, voice: PreparedVoice | None):
        """Prompt ids as the processor documents them: [voice BOS, one placeholder per voice latent]
        + text as the chat template prepares it + the first audio position."""
        processor = self.processor
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": unit}]}])
        for token in self._placeholders:  # the template's own audio markers; placed below
            text = text.replace(token, "")
        latents = None
        if voice is not None:
            latents = [torch.as_tensor(voice.tensors["audio_prompt_latents"]).float().cpu()]
            text = (processor.audio_prompt_bos_token or "") + processor.audio_token + text
        return processor(text=text + processor.audio_bos_token, audio_prompt_latents=latents, return_tensors="pt")

    def _max_frames(self, input_ids: torch.Tensor) -> int:
        """The original runtime's frame budget from the text length, (tokens / 3 + 2) s of frames,
        within the model's positions: random or failing models that never end still stop."""
        text_tokens = sum(1 for i in input_ids[0].tolist() if i not in self._placeholder_ids)
        budget = math.ceil((text_tokens / 3 + 2) * float(self.config.frame_rate))
        return max(1, min(budget, int(self.config.max_position_embeddings) - input_ids.shape[1]))

    @staticmethod
    def _sampling(settings: SynthesisSettings) -> dict[str, Any]:
        """noise_scale is the flow sampler's temperature (the variance of its noise); 0 is greedy
        (no noise, deterministic); None keeps the checkpoint's generation config."""
        if settings.noise_scale is None:
            return {}
        if settings.noise_scale == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(settings.noise_scale)}

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        inputs = self._inputs(unit, voice)
        max_new_tokens = self._max_frames(inputs["input_ids"])
        frames_after_eos = inputs.pop("frames_after_eos")  # the stopping rule's, kept on the CPU
        model_inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                        for k, v in inputs.items()}
        self.generator(settings)
        with torch.inference_mode():
            out = self.model.generate(**model_inputs, frames_after_eos=frames_after_eos,
                                      max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                                      **self._sampling(settings))
            # the codec decodes in fp32 (processor.decode casts to its dtype) and fades the start in
            wave = self.processor.decode(out.audio_latents.float(), out.audio_latents_mask)[0]
        yield np.clip(wave.numpy(), -1.0, 1.0).astype(np.float32, copy=False)


def _codec_folder(folder: Path, reference: dict) -> Path:
    """The codec's folder: the path processor_config.json records (relative to the model folder,
    absolute, or a hub id in the local Hugging Face cache), else our audio_tokenizer/ subfolder."""
    name = str(reference.get("audio_tokenizer_name_or_path") or "")
    candidates = [Path(name).expanduser() if Path(name).is_absolute() else folder / name] if name else []
    candidates.append(folder / CODEC_SUBFOLDER)
    for candidate in candidates:
        if (candidate / "config.json").is_file() and candidate.resolve() != folder.resolve():
            return candidate
    if name and looks_like_hub_id(name):
        return locate(name)  # never downloads: ModelNotFoundError says how to fetch it
    raise ModelNotFoundError(f"the Pocket TTS audio tokenizer (codec) was not found: processor_config.json "
                             f"names {name or 'none'!r} and {folder / CODEC_SUBFOLDER} does not exist; put the "
                             "PocketTTSAudioTokenizerModel's save_pretrained files there")
