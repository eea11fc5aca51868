"""Boson AI's Higgs Audio V2 (HiggsAudioV2ForConditionalGeneration): a Llama-3.2-3B-shaped LM whose
layers carry a second, "audio" FFN; each LM step emits one frame of 8 codebooks (codebook k delayed by
k frames) of its audio tokenizer (HiggsAudioV2TokenizerModel: HuBERT + DAC, 25 frames/s at 24 kHz).

* Layout (layout.py): attention and the audio FFN run per frame, the text FFN and the text embedding
  only in the prompt prefill; the audio tokenizer is a sub-model (codec.py), kept fp32.
* Voice: the reference clip is encoded once (prepare_voice) to delayed codes; every sentence's inputs
  are then built from them (prompt.py) as the processor would build them, without running the encoder.
* Synthesis: one generate() call per sentence (or per batch of sentences), greedy or sampled, capped
  by the sentence's length; the codes are decoded by the tokenizer's DAC decoder.
* Streaming is one chunk per sentence: the DAC decoder is a non-causal conv stack (chunks decoded apart
  differ at their seams unless overlapped and cross-faded, which changes the samples), and generate()
  hands the codes back only at its end (its streamer receives the text-side ids, not the frames).
* No torchaudio (codec.py): the tokenizer's one torchaudio call is answered by edge_runtime.dsp.

Folder layout: what save_pretrained writes for the LM (config.json, generation_config.json, the
sharded safetensors, tokenizer files, processor_config.json) plus the audio tokenizer's files, found
where processor_config.json points (an absolute path, a path inside the folder, or a hub id in the
local Hugging Face cache) or else in `audio_tokenizer/` beside the LM's files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import ModelSource, SubModel, SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel, codec_folder, read_config
from edge_runtime.models.higgs_audio_v2 import codec, prompt
from edge_runtime.models.registry import register
from edge_runtime.prepared_voice import PreparedVoice

log = logging.getLogger(__name__)

# Frame cap per sentence: the planner's speech rate (14 chars/s) with 1.5x head room for slow
# speakers, plus a second for short sentences; a trained model stops earlier at its all-eos frame.
LENGTH_MARGIN = 1.5
EXTRA_SECONDS = 1.0


@register
class HiggsAudioV2SpeechModel(HFSpeechModel):
    family = "higgs_audio_v2"
    model_class = "HiggsAudioV2ForConditionalGeneration"
    always_fp32 = ()  # nothing in the LM fails in bf16; the audio tokenizer is its own fp32 sub-model
    sample_rate = 24000
    prompt_sample_rate = 24000
    supports_instructions = True  # the scene description of the system turn
    supports_batch = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg, proc = self.config, self.processor
        self.codec = proc.audio_tokenizer
        self.tokenizer = proc.tokenizer
        self.sample_rate = self.prompt_sample_rate = int(self.codec.config.sample_rate)
        self.frame_rate = float(self.codec.config.frame_rate)
        self.num_codebooks = int(cfg.num_codebooks)
        # the LM's config is the source of truth for the stream ids the processor writes
        proc.audio_stream_bos_id, proc.audio_stream_eos_id = int(cfg.audio_stream_bos_id), int(cfg.audio_stream_eos_id)
        proc.feature_extractor.sampling_rate = self.sample_rate
        self.pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id)

    # -- the family ----------------------------------------------------------------------------
    @classmethod
    def codec_config(cls, source: ModelSource, config):
        """The audio tokenizer's folder and config, checked against the LM's codebooks."""
        folder = codec_folder(source, codec.SUBFOLDER, "audio tokenizer (HiggsAudioV2TokenizerModel)")
        codec_config = codec.read_config(folder)
        quantizers, codes = int(codec_config.num_quantizers), int(codec_config.codebook_size)
        # the LM predicts num_codebooks codebooks of codebook_size ids: the codec's codes, then stream bos/eos
        stream_ids = (int(config.audio_stream_bos_id), int(config.audio_stream_eos_id))
        in_range = all(codes <= i < int(config.codebook_size) for i in stream_ids)
        if quantizers != int(config.num_codebooks) or not in_range:
            raise ModelNotFoundError(
                f"the audio tokenizer in {folder} ({quantizers} codebooks of {codes} codes) does not fit the LM "
                f"in {source.path} ({config.num_codebooks} codebooks of {config.codebook_size} ids, stream "
                f"bos/eos {config.audio_stream_bos_id}/{config.audio_stream_eos_id}): wrong tokenizer for this model?")
        return folder, codec_config

    @classmethod
    def require_weights(cls, folder: Path) -> None:
        """The LM's shards (each missing one named) and the audio tokenizer's weights must be there."""
        from edge_runtime.models.source import has_weights

        super().require_weights(folder)
        tokenizer = codec_folder(ModelSource(cls, str(folder), folder), codec.SUBFOLDER,
                                 "audio tokenizer (HiggsAudioV2TokenizerModel)")
        if not has_weights(tokenizer):
            raise ModelNotFoundError(f"the audio tokenizer folder {tokenizer} holds config files only: put its "
                                     "model.safetensors there (HiggsAudioV2TokenizerModel.save_pretrained)")

    @classmethod
    def codec_part(cls, source: ModelSource, config):
        folder, codec_config = cls.codec_config(source, config)
        part = SubModel(name="codec", build=lambda: codec.build(codec_config), checkpoint=folder,
                        dtype=torch.float32)
        return part, lambda dtype: codec.layout(codec_config, dtype)

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        from edge_runtime.models.higgs_audio_v2.layout import model_layout

        config = read_config(source.path)
        _, codec_config = cls.codec_config(source, config)
        main = model_layout(cls.transformers_class(), config, dtype, float(codec_config.frame_rate),
                            cls.fp32_modules(fp32_components))
        return main.with_submodel("codec", codec.layout(codec_config, dtype))

    @classmethod
    def load_processor(cls, folder: Path, codec_model=None):
        """HiggsAudioV2Processor from its parts, with the audio tokenizer the backend placed
        (AutoProcessor would load it again, from processor_config.json's absolute path, outside the plan)."""
        from transformers import AutoTokenizer, DacFeatureExtractor

        try:
            features = DacFeatureExtractor.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load Higgs Audio's processor (text tokenizer, feature extractor) "
                                     f"from {folder}: {exc}") from None
        template = Path(folder) / "chat_template.jinja"
        chat = template.read_text(encoding="utf-8") if template.is_file() else None
        return codec.build_processor(features, tokenizer, codec_model, chat_template=chat)

    def components(self) -> dict:
        inner = self.model.model
        return {"text_embedding": inner.embed_tokens, "layers": inner.layers,
                "audio_embedding": inner.embed_audio_tokens, "audio_head": self.model.audio_lm_head,
                "codec": self.codec}

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0 or settings.noise_w is not None:
            raise InvalidInputError(f"{self.model_id} (Higgs Audio) has no speaking-rate or duration-noise "
                                    "control; leave speed at 1.0 and noise_w unset (noise_scale sets the "
                                    "sampling temperature, 0 = greedy; instructions set the scene description)")

    # -- voice prompt --------------------------------------------------------------------------
    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """Mono float32 at sample_rate -> (codebooks, frames) codes, as the processor encodes a clip."""
        features = self.processor.feature_extractor(np.asarray(audio, dtype=np.float32), padding=False,
                                                    sampling_rate=self.sample_rate, return_tensors="pt")
        with torch.inference_mode():
            codes = self.codec.encode(features["input_values"].to(self.device, torch.float32)).audio_codes
        return codes[0].cpu()

    def prepare_voice(self, audio: np.ndarray, sample_rate: int,
                      transcript: str | None = None) -> PreparedVoice:
        if sample_rate != self.prompt_sample_rate:
            from edge_runtime.dsp import resample

            audio = resample(audio, sample_rate, self.prompt_sample_rate)
        if not transcript:
            log.warning("Higgs Audio clones a voice best with the prompt's transcript; without it the "
                        "prompt's turn has no text")
        self.calls["encode_prompt"] += 1
        codes = self.encode(audio)
        delayed = prompt.delayed_codes(self.processor, codes)
        return PreparedVoice(tensors={"audio_input_ids": delayed}, model_id=self.model_id,
                             sample_rate=self.prompt_sample_rate, transcript=transcript or "",
                             extra={"frames": int(codes.shape[1])})

    # -- synthesis -------------------------------------------------------------------------------
    def prompt_for(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None) -> prompt.Prompt:
        scene = settings.instructions if settings.instructions else prompt.SCENE
        codes = None if voice is None else torch.as_tensor(voice.tensors["audio_input_ids"])
        return prompt.build_prompt(self.processor, unit, scene, codes, voice.transcript if voice else None)

    def max_new_tokens(self, unit: str, prompt_tokens: int) -> int:
        """LM steps for one sentence: the frames its text should need with head room, plus the stream-bos
        frame and the delay tail (num_codebooks - 1 steps), within the positions left after the prompt."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S

        frames = math.ceil(self.frame_rate * (len(unit) / SPEECH_CHARS_PER_S * LENGTH_MARGIN + EXTRA_SECONDS))
        room = int(self.config.max_position_embeddings) - prompt_tokens
        if room <= self.num_codebooks:
            raise InvalidInputError(f"the voice prompt and sentence fill {prompt_tokens} of the LM's "
                                    f"{self.config.max_position_embeddings} positions; use a shorter prompt "
                                    "(limits.max_prompt_seconds) or shorter sentences")
        return min(frames + self.num_codebooks, room)

    def generate_options(self, settings: SynthesisSettings) -> dict:
        """generation_config.json's decoding unless the request says: noise_scale 0 = greedy, with no
        randomness at all (reproducible without a seed), another value = sampling at that temperature.
        The published config decodes greedily with repetition-aware sampling (``ras_win_len``: a code
        repeated in the last frames is resampled at random); greedy turns that off."""
        if settings.noise_scale == 0:
            options = {"do_sample": False}
            if getattr(self.model.generation_config, "ras_win_len", None) is not None:
                options["ras_win_len"] = None
            return options
        if settings.noise_scale is not None:
            return {"do_sample": True, "temperature": float(settings.noise_scale)}
        return {}

    def generate(self, units: list[str], settings: SynthesisSettings,
                 voice: PreparedVoice | None) -> list[torch.Tensor]:
        """One generate() call for the units (same voice and settings): per unit its generated steps
        (steps, codebooks), cut at its own step cap."""
        prompts = [self.prompt_for(unit, settings, voice) for unit in units]
        caps = [self.max_new_tokens(unit, len(p.input_ids)) for unit, p in zip(units, prompts)]
        inputs = prompt.batch_inputs(prompts, self.pad_id, self.device)
        start = 0 if voice is None else inputs["audio_input_ids"].shape[1]
        self.generator(settings)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max(caps), **self.generate_options(settings))
        return [out[row, start:start + cap].cpu() for row, cap in enumerate(caps)]

    def decode(self, steps: torch.Tensor) -> np.ndarray:
        """Generated steps (stream-bos frame first, delayed codebooks) -> float32 audio of the frames
        before the first all-eos step, every codebook undelayed (the processor's decode, per row)."""
        cfg = self.config
        eos = (steps == cfg.audio_stream_eos_id).all(dim=-1).nonzero()
        end = int(eos.min()) if eos.numel() else steps.shape[0]
        body = steps[1:end]  # after the stream-bos frame
        if body.shape[0] < self.num_codebooks:
            return np.zeros(0, dtype=np.float32)
        codes = self.processor.revert_delay_pattern(body).clip(0, cfg.audio_stream_bos_id - 1)
        with torch.inference_mode():
            audio = self.codec.decode(codes.T[None].to(self.device)).audio_values
        return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32, copy=False)

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        (steps,) = self.generate([unit], settings, voice)
        audio = self.decode(steps)
        yield audio  # one chunk per sentence, also when streaming (see the module docstring)

    def synthesize_batch(self, units: list[str], settings: SynthesisSettings,
                         voice: PreparedVoice | None = None) -> list[np.ndarray]:
        """Several sentences in ONE generate() call; each row keeps its own step cap and ends at its
        own all-eos frame (rows that finished early are padded with eos frames by generate())."""
        if not units:
            return []
        return [self.decode(steps) for steps in self.generate(units, settings, voice)]
