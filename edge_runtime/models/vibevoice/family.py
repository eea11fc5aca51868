"""Microsoft VibeVoice (transformers' VibeVoiceForConditionalGeneration): a Qwen2 LM decides, frame by
frame at 7.5 frames/s, whether to speak on; a diffusion head turns its hidden state into a 64-dim
acoustic latent (guided by a second, unconditional LM branch), a streaming acoustic decoder turns
the latent into 3200 samples of 24 kHz audio, and a semantic encoder feeds that audio back.

Zero-shot cloning: the reference clip is encoded ONCE (prepare_voice: the acoustic encoder with
``sample=False``, deterministic) and its latents cached; each sentence's prompt scatters them over
its placeholders (prompt.py), so the encoder never runs again for that voice. Synthesis goes
through transformers' own generate() on our subclass (model.py), which drops the generic CFG
logits processor's third LM pass per frame (see model.py for when that changes the output).

Settings: VibeVoice picks tokens by argmax (do_sample is ignored by the model); the randomness is
the diffusion's starting noise, so ``seed`` makes audio reproducible and ``noise_scale`` scales that
noise (None = 1, the model's own; 0 = none: deterministic without a seed). No speaking-rate or
duration-noise control, no built-in speakers. Streaming: one chunk per frame (3200 samples), as
the decoder produces it. Batching: sentences share one generate() (left-padded prompts).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import ModelSource, Placer, SubModel, SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel, read_config
from edge_runtime.models.registry import register
from edge_runtime.models.vibevoice import layout as vv_layout
from edge_runtime.models.vibevoice import prompt as vv_prompt
from edge_runtime.models.vibevoice.model import align_dtypes, generation_class
from edge_runtime.models.vibevoice.scheduler import DiffusionSettings, build_scheduler, read_settings
from edge_runtime.models.vibevoice.stepwise import stepwise
from edge_runtime.prepared_voice import PreparedVoice


# Frame cap per sentence: the planner's speech rate (14 chars/s) with 1.5x head room, plus a second
# for short sentences, plus the audio-eos and eos steps; a trained model stops earlier at its eos.
LENGTH_MARGIN = 1.5
EXTRA_SECONDS = 1.0
END_STEPS = 2
# Classes a device map must not cut (LARGE_MODELS.md): transformers lists only the diffusion head
# on the top class; the LM's layers and the tokenizer halves are whole blocks too.
NO_SPLIT = ("Qwen2DecoderLayer", "VibeVoiceAcousticTokenizerEncoderModel", "VibeVoiceAcousticTokenizerDecoderModel",
            "VibeVoiceDiffusionHead")
# Profile component names -> the modules they cover (precision.fp32_components may name them).
COMPONENT_MODULES = {
    "embeddings": ("model.language_model.embed_tokens",),
    "lm": ("model.language_model.layers",),
    "lm_head": ("model.language_model.norm", "lm_head"),
    "acoustic_encoder": ("model.audio_tower.encoder",),
    "acoustic_decoder": ("model.audio_tower.decoder",),
    "semantic_encoder": ("model.semantic_tokenizer_encoder",),
    "diffusion_head": ("model.diffusion_head",),
    "connectors": ("model.multi_modal_projector", "model.semantic_connector"),
}
AUDIO_BLOCKS = ("model.audio_tower.encoder", "model.audio_tower.decoder", "model.semantic_tokenizer_encoder",
                "model.multi_modal_projector", "model.semantic_connector", "model.diffusion_head")


@register
class VibeVoiceSpeechModel(HFSpeechModel):
    family = "vibevoice"
    model_class = "VibeVoiceForConditionalGeneration"
    # The acoustic encoder runs once per voice (off the per-frame path, often on the CPU where fp32 is
    # the fast path) and its latents are cached: fp32 there costs no frame time. The latent factors
    # are two scalars the latents are scaled by. transformers and Microsoft's code run everything in
    # the checkpoint's bf16; the per-frame audio parts stay in the plan's dtype (fp32 for the ~690M
    # decoder + semantic encoder would not fit VibeVoice-1.5B on a 6 GB card).
    always_fp32 = ("model.audio_tower.encoder", "model.latent_scaling_factor", "model.latent_bias_factor")
    sample_rate = 24000
    prompt_sample_rate = 24000
    supports_batch = True

    def __init__(self, *args, diffusion=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        self.diffusion = diffusion or DiffusionSettings()
        self.scheduler = build_scheduler(self.diffusion)
        self.hop = math.prod(self.config.audio_config.downsampling_ratios)
        self.frame_rate = self.sample_rate / self.hop
        model.execution_device = self.device
        dtypes = {name: _module_dtype(model.get_submodule(name)) for name in AUDIO_BLOCKS}
        model.decoder_dtype = dtypes["model.audio_tower.decoder"]
        self.lm_dtype = _module_dtype(model.get_input_embeddings())
        self._hooks = align_dtypes(model, dtypes, self.lm_dtype)
        self.encoder_dtype = dtypes["model.audio_tower.encoder"]
        self.processor.tokenizer.padding_side = "left"
        self.processor.feature_extractor.sampling_rate = self.sample_rate

    # -- the family ----------------------------------------------------------------------------
    @classmethod
    def transformers_class(cls):
        return generation_class()

    @classmethod
    def fp32_modules(cls, fp32_components=()) -> tuple[str, ...]:
        mapped = [m for c in fp32_components for m in COMPONENT_MODULES.get(c, (c,))]
        return tuple(dict.fromkeys((*cls.always_fp32, *mapped)))

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        config = read_config(source.path)
        steps = read_settings(source.path).steps
        return vv_layout.model_layout(cls.transformers_class(), config, dtype, cls.fp32_modules(fp32_components),
                                      steps)

    @classmethod
    def main_part(cls, source: ModelSource, config, fp32_components=()) -> SubModel:
        model_class = cls.transformers_class()
        return SubModel(name="", build=lambda: model_class._from_config(config), checkpoint=source.path,
                        fp32_modules=cls.fp32_modules(fp32_components), no_split_modules=NO_SPLIT)

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> VibeVoiceSpeechModel:
        folder = source.path
        config = read_config(folder)
        diffusion = read_settings(folder)
        build_scheduler(diffusion)  # a missing diffusers fails before any weight is read
        processor = cls.load_processor(folder)
        model = placer.place(cls.main_part(source, config, placer.fp32_components))
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, config, source.model_id, placer.device, placer.dtype, diffusion=diffusion)

    @classmethod
    def load_processor(cls, folder: Path, codec=None):
        processor = super().load_processor(folder, codec)
        if type(processor).__name__ != "VibeVoiceProcessor" or not getattr(processor, "chat_template", None):
            raise ModelNotFoundError(f"{folder} has no VibeVoice processor with a chat template "
                                     "(processor_config.json, tokenizer files, chat_template.jinja)")
        return processor

    def components(self) -> dict:
        inner = self.model.model
        return {"acoustic_encoder": inner.audio_tower.encoder, "embeddings": inner.language_model.embed_tokens,
                "lm": inner.language_model, "lm_head": self.model.lm_head,
                "connectors": (inner.multi_modal_projector, inner.semantic_connector),
                "diffusion_head": inner.diffusion_head, "acoustic_decoder": inner.audio_tower.decoder,
                "semantic_encoder": inner.semantic_tokenizer_encoder}

    def split_text(self, text: str) -> list[str]:
        for token in vv_prompt.control_tokens(self.processor):  # checked before any compute
            if token in text:
                raise InvalidInputError(f"the text contains VibeVoice's control token {token!r}; remove it")
        return super().split_text(text)

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0 or settings.noise_w is not None:
            raise InvalidInputError(f"{self.model_id} (VibeVoice) has no speaking-rate or duration-noise control; "
                                    "leave speed at 1.0 and noise_w unset (noise_scale scales the diffusion noise, "
                                    "0 = none)")

    def describe(self) -> dict:
        return {**super().describe(), "frame_rate": self.frame_rate, "diffusion_steps": self.diffusion.steps,
                "guidance_scale": self.guidance_scale,
                "lm_passes_per_frame": 3 if self.model.lm_guidance and self.guidance_scale != 1 else 2}

    @property
    def guidance_scale(self) -> float:
        return float(self.model.generation_config.guidance_scale or 1.0)

    # -- voice prompt --------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> PreparedVoice:
        """The clip's acoustic latents (deterministic: ``sample=False``), computed once: (frames, dim)
        fp32, one frame per 3200 samples (the processor's placeholder count)."""
        if sample_rate != self.prompt_sample_rate:
            from edge_runtime.dsp import resample

            audio = resample(audio, sample_rate, self.prompt_sample_rate)
        features = self.processor.feature_extractor(np.asarray(audio, dtype=np.float32),
                                                    sampling_rate=self.prompt_sample_rate)
        frames = int(math.ceil(int(features["padding_mask"].sum()) / self.hop))
        self.calls["encode_prompt"] += 1
        values = features["input_values"].to(self.device, self.encoder_dtype)
        latents = self.encode(values)[0, :frames]
        return PreparedVoice(tensors={"latents": latents.float().cpu()}, model_id=self.model_id,
                             sample_rate=self.prompt_sample_rate, transcript=transcript,
                             extra={"frames": frames})

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """(1, 1, samples) -> (1, frames, dim) acoustic latents, as get_audio_features computes them
        (``sample=False``): in one pass up to layout.ENCODE_CHUNK_SECONDS (bit-identical to
        transformers), beyond that chunk by chunk through the causal convs' cache (the same latents
        to float rounding, with activations bounded by one chunk)."""
        tower = self.model.model.audio_tower
        chunk = vv_layout.encode_chunk_frames(self.config) * self.hop
        if values.shape[-1] <= chunk:
            return tower.encode(values, sample=False).latents
        from transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer import \
            VibeVoiceAcousticTokenizerConv1dPaddingCache

        cache = VibeVoiceAcousticTokenizerConv1dPaddingCache()
        parts = [tower.encode(values[..., start:start + chunk], padding_cache=cache, use_cache=True,
                              sample=False).latents for start in range(0, values.shape[-1], chunk)]
        return torch.cat(parts, dim=1)

    # -- synthesis -------------------------------------------------------------------------------
    def max_new_tokens(self, unit: str, prompt_tokens: int) -> int:
        """Steps for one sentence: the frames its text should need with head room, plus the
        audio-eos and eos steps, within the LM's positions left after the prompt."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S

        frames = math.ceil(self.frame_rate * (len(unit) / SPEECH_CHARS_PER_S * LENGTH_MARGIN + EXTRA_SECONDS))
        room = int(self.config.text_config.max_position_embeddings) - prompt_tokens
        if room <= END_STEPS:
            raise InvalidInputError(f"the voice prompt and sentence fill {prompt_tokens} of the LM's "
                                    f"{self.config.text_config.max_position_embeddings} positions; use a shorter "
                                    "prompt (limits.max_prompt_seconds) or shorter sentences")
        return min(frames + END_STEPS, room)

    def _prompt(self, units: list[str], voice: PreparedVoice | None) -> vv_prompt.Prompt:
        latents = None if voice is None else torch.as_tensor(voice.tensors["latents"])
        return vv_prompt.build(self.model, self.processor, units, latents)

    def _generate(self, prompt: vv_prompt.Prompt, max_new_tokens: int, settings: SynthesisSettings,
                  sink=None) -> list[np.ndarray]:
        """One generate() over the prompt's rows -> per row the float32 audio of its frames."""
        model = self.model
        model.noise_scale, model.chunk_sink = settings.noise_scale, sink
        try:
            audio = model.generate(input_ids=prompt.input_ids, inputs_embeds=prompt.inputs_embeds,
                                   attention_mask=prompt.attention_mask, max_new_tokens=max_new_tokens,
                                   noise_scheduler=self.scheduler, num_diffusion_steps=self.diffusion.steps)
        finally:
            model.noise_scale, model.chunk_sink = None, None
        return [_to_numpy(a) for a in audio]

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        prompt = self._prompt([unit], voice)
        cap = self.max_new_tokens(unit, prompt.length)
        self.generator(settings)
        if not stream:
            with torch.inference_mode():
                (audio,) = self._generate(prompt, cap, settings)
            yield audio  # outside inference mode: the consumer runs between our steps
            return
        # one chunk per frame, as the streaming decoder makes it; the worker computes only while
        # the caller is inside next() (the runtime's lock and inference mode are held there)
        yield from stepwise(lambda emit: self._generate(prompt, cap, settings, sink=lambda a: emit(_to_numpy(a[0]))),
                            name="vibevoice-generate")

    def synthesize_batch(self, units: list[str], settings: SynthesisSettings,
                         voice: PreparedVoice | None = None) -> list[np.ndarray]:
        """Several sentences in ONE generate() (left-padded prompts, the voice's latents in every row):
        one audio per unit, each cut at its own frame cap. The diffusion noise is drawn for the whole
        batch, so seeded audio differs from one by one; with noise_scale 0 rows match their solo runs
        to float rounding (padding changes the LM's matmul shapes)."""
        if not units:
            return []
        if len(units) == 1:
            return [np.concatenate(list(self.synthesize_unit(units[0], settings, voice)))]
        prompt = self._prompt(units, voice)
        lengths = prompt.attention_mask.sum(dim=1).tolist()
        caps = [self.max_new_tokens(u, int(n)) for u, n in zip(units, lengths)]
        self.generator(settings)
        with torch.inference_mode():
            audio = self._generate(prompt, max(caps), settings)
        return [a[: cap * self.hop] for a, cap in zip(audio, caps)]

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _module_dtype(module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _to_numpy(audio) -> np.ndarray:
    if audio is None:
        return np.zeros(0, dtype=np.float32)
    return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
