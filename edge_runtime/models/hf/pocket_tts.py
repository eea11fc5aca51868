"""Pocket TTS (transformers' PocketTTSForConditionalGeneration): a causal transformer over the
voice prompt's latents, the text and the generated latents, with a flow head sampling one
continuous latent per audio frame.

Its audio tokenizer (the codec that encodes the prompt into latents and decodes generated latents
into 24 kHz audio) is not a submodule of the model: it is a separate PocketTTSAudioTokenizerModel
the processor holds, with its own weights: a sub-model of the family ("audio_tokenizer"), planned in
the same budget and placed by the same backend, in fp32 (~20M parameters at the released size).
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
from edge_runtime.models.base import ModelSource, SubModel, SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel, codec_folder
from edge_runtime.models.registry import register

# The flow head integrates each frame's latent in num_flow_steps Euler steps; the released
# checkpoints' generation config uses 1 (transformers' default too).
FLOW_STEPS = 1
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


@register
class PocketTTSSpeechModel(HFSpeechModel):
    family = "pocket_tts"
    model_class = "PocketTTSForConditionalGeneration"
    # transformers keeps these fp32 under bf16/fp16 (_keep_in_fp32_modules_strict): the latent
    # statistics and the flow-time frequencies. The codec is fp32 too, outside the model (see top).
    always_fp32 = ("latent_mean", "latent_std", "flow_head.timestep_embeddings.0.freqs",
                   "flow_head.timestep_embeddings.1.freqs")
    sample_rate = 24000
    prompt_sample_rate = 24000

    def __init__(self, model: Any, processor: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, processor, config, *args, **kwargs)
        self.codec = processor.audio_tokenizer  # placed by the backend in fp32 (codec_part)
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
    def model_layout(cls, config, dtype: torch.dtype, fp32_components=()):
        """One causal transformer over voice-prompt latents, text tokens and generated latents (one
        step per audio frame), whose last hidden state conditions a flow head that turns noise into
        the frame's latent (also once per frame: AR, one position per call)."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S, TEXT_TOKENS_PER_CHAR, build_on_meta, describe_model

        model = build_on_meta(config, cls.transformers_class())
        backbone = model.model
        components = {
            # run at every step too: the step's placeholder id, the BOS latent and the previous latent
            "embeddings": [backbone.embed_tokens, backbone.audio_prompt_proj, backbone.audio_latent_proj],
            "decoder": [*backbone.layers, backbone.norm, model.eos_head],
            "flow_head": model.flow_head,  # one block: _no_split_modules keeps it whole
        }
        layout = describe_model(model, components, {"embeddings", "decoder", "flow_head"}, dtype,
                                cls.fp32_modules(fp32_components))
        layout = layout.replace_component("flow_head", token_cap=1, passes_per_token=FLOW_STEPS)
        frame_rate = float(config.frame_rate)
        return layout.with_hints(
            # the prompt holds the text tokens, then one position per generated frame
            tokens_per_char=frame_rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
            prompt_tokens_per_s=frame_rate,  # one position per voice-prompt latent; no transcript
            max_positions=int(config.max_position_embeddings))

    @classmethod
    def codec_part(cls, source: ModelSource, config):
        """The audio tokenizer the processor holds (encodes prompts to latents, decodes generated
        latents to audio): where processor_config.json points, else audio_tokenizer/."""
        from transformers import PocketTTSAudioTokenizerConfig, PocketTTSAudioTokenizerModel

        folder = codec_folder(source, CODEC_SUBFOLDER, "audio tokenizer (codec)")
        try:
            codec_config = PocketTTSAudioTokenizerConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing or foreign codec config
            raise ModelNotFoundError(f"cannot read the Pocket TTS audio tokenizer config in {folder}: {exc}") from None
        part = SubModel(name="audio_tokenizer", build=lambda: PocketTTSAudioTokenizerModel(codec_config),
                        checkpoint=folder, dtype=torch.float32)
        return part, functools.partial(codec_layout, codec_config, float(config.frame_rate))

    @classmethod
    def load_processor(cls, folder: Path, codec=None):
        """Feature extractor and tokenizer from the folder, with the codec the backend placed.
        transformers would resolve a relative codec path against the working directory (and load
        it outside the plan), so the processor is assembled here instead of by AutoProcessor."""
        from transformers import AutoFeatureExtractor, AutoTokenizer, PocketTTSProcessor

        try:
            settings = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            template = folder / "chat_template.jinja"
            return PocketTTSProcessor(
                AutoFeatureExtractor.from_pretrained(folder, local_files_only=True), tokenizer,
                audio_tokenizer=codec,
                chat_template=(template.read_text(encoding="utf-8") if template.is_file()
                               else settings.get("chat_template") or tokenizer.chat_template),
                **{k: settings[k] for k in _PROCESSOR_OPTIONS if k in settings})
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load the Pocket TTS processor (tokenizer, feature extractor) "
                                     f"from {folder}: {exc}") from None

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


def codec_layout(config, frame_rate: float, dtype: torch.dtype):
    """The audio tokenizer: one non-AR block kept fp32; at its last stage a few tensors of
    (filters x samples per frame) are alive per frame, one row at a time, for the generated frames."""
    from transformers import PocketTTSAudioTokenizerModel

    from edge_runtime.policy.planner import CODEC_ACTIVATION_COPIES, SPEECH_CHARS_PER_S, build_on_meta, describe_model

    model = build_on_meta(config, PocketTTSAudioTokenizerModel)
    layout = describe_model(model, {"audio_tokenizer": model}, set(), dtype, ("audio_tokenizer",))
    samples_per_frame = int(round(float(config.sampling_rate) / frame_rate))
    width = CODEC_ACTIVATION_COPIES * samples_per_frame * int(config.num_filters)
    # stays resident: the processor calls its encode/decode methods, outside forward()
    return layout.replace_component("audio_tokenizer", activation_width=width, batch_cap=1, stays_resident=True,
                                    tokens_per_char=frame_rate / SPEECH_CHARS_PER_S)
