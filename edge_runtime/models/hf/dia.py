"""Nari Labs Dia (DiaForConditionalGeneration): a byte-level text encoder run once per sentence and a
decoder emitting one 9-channel DAC frame per step, with channel c delayed by delay_pattern[c] frames.

The DAC codec is not part of the transformers model: DiaProcessor holds it as its `audio_tokenizer`
(a DacModel with its own checkpoint). It is a sub-model of the family ("codec"), planned in the same
budget as the model and placed by the same backend, in fp32 (codecs are fragile in half precision).

Voice cloning is Dia's own convention: the reference clip is DAC-encoded once (prepare_voice) into
delayed `decoder_input_ids`; each sentence is then generated from the text
"[S1] <prompt transcript> [S1] <sentence>" with those ids as the decoder prefix, and the prompt's
frames are cut off the output before decoding.

Folder layout: what save_pretrained writes (config.json, generation_config.json, model.safetensors,
tokenizer_config.json, processor_config.json) plus, optionally, the codec in a `dac/` subfolder
(DacModel.save_pretrained). A hub download has no `dac/`: its processor_config.json names the codec
by hub id (descript/dac_44khz), resolved in the local Hugging Face cache like the model itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.models.base import ModelSource, SubModel, SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel, codec_folder
from edge_runtime.models.registry import register

log = logging.getLogger(__name__)

# Dia's audio codec is DAC at 44.1 kHz with a hop of 512 samples -> ~86 frames per second.
DIA_FRAMES_PER_S = 44100 / 512
CODEC_SUBFOLDER = "dac"  # where our folders keep the codec (DacModel.save_pretrained)
# Cap on generated frames per character of text: the planner's speech rate (~6 frames per char at
# 86 frames/s and 14 chars/s) with 1.5x head room for slow speakers; the real model stops at its EOS.
LENGTH_MARGIN = 1.5


@register
class DiaSpeechModel(HFSpeechModel):
    family = "dia"
    model_class = "DiaForConditionalGeneration"
    # Nothing inside DiaForConditionalGeneration is fragile in bf16; its codec is a sub-model of
    # its own, placed in fp32 (codecs are fragile in half precision).
    always_fp32 = ()
    sample_rate = 44100
    prompt_sample_rate = 44100
    supports_batch = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        codec = self.codec
        # Output and prompt both at the codec's rate (44.1 kHz for Dia). The feature extractor only
        # pads, but rejects audio whose rate differs from its own (FACTS: it defaults to 16 kHz).
        self.sample_rate = self.prompt_sample_rate = int(codec.config.sampling_rate)
        self.processor.feature_extractor.sampling_rate = self.sample_rate
        dec = self.config.decoder_config
        self.delays = list(self.config.delay_pattern)
        # the processor's audio defaults are the published model's; take this config's instead
        self.processor_kwargs = {"delay_pattern": self.delays, "bos_token_id": dec.bos_token_id,
                                 "eos_token_id": dec.eos_token_id, "pad_token_id": dec.pad_token_id,
                                 "sampling_rate": self.sample_rate}

    @property
    def codec(self):
        return self.processor.audio_tokenizer

    # -- the family ----------------------------------------------------------------------------
    @classmethod
    def model_layout(cls, config, dtype: torch.dtype, fp32_components=()):
        """A text encoder run once per request (non-AR) and a decoder emitting one multi-channel
        DAC frame per step (AR)."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S, build_on_meta, describe_model

        model = build_on_meta(config, cls.transformers_class())
        enc, dec = model.model.encoder, model.model.decoder
        components = {
            # named as the profiles name it (keep_resident: [text_encoder, ..., decoder])
            "text_encoder": [enc.embedding, *enc.layers, enc.norm],
            "decoder": [dec.embeddings, *dec.layers, dec.norm, model.logits_dense],
        }
        layout = describe_model(model, components, {"decoder"}, dtype, cls.fp32_modules(fp32_components))
        text_cap = int(config.encoder_config.max_position_embeddings)  # byte-level text tokens
        layout = layout.replace_component("text_encoder", token_cap=text_cap)
        layout = layout.replace_component("decoder", cross_token_cap=text_cap)
        return layout.with_hints(tokens_per_char=DIA_FRAMES_PER_S / SPEECH_CHARS_PER_S,
                                 prompt_tokens_per_s=DIA_FRAMES_PER_S,
                                 max_positions=int(config.decoder_config.max_position_embeddings))

    @classmethod
    def codec_part(cls, source: ModelSource, config):
        """The DAC codec DiaProcessor holds: from `dac/` beside the model's files, or the hub id
        processor_config.json names (descript/dac_44khz for the published model)."""
        from transformers import DacConfig, DacModel

        folder = codec_folder(source, CODEC_SUBFOLDER, "DAC codec")
        try:
            dac_config = DacConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing or foreign codec config
            raise ModelNotFoundError(f"cannot read Dia's DAC codec config in {folder}: {exc}") from None
        part = SubModel(name="codec", build=lambda: DacModel(dac_config), checkpoint=folder, dtype=torch.float32)
        return part, functools.partial(dac_layout, dac_config)

    @classmethod
    def load_processor(cls, folder: Path, codec=None):
        """DiaProcessor from its parts, with the DAC the backend placed (AutoProcessor would load
        the codec again, outside the plan)."""
        from transformers import DiaFeatureExtractor, DiaProcessor, DiaTokenizer

        try:
            features = DiaFeatureExtractor.from_pretrained(folder, local_files_only=True)
            tokenizer = DiaTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - missing or broken processor files
            raise ModelNotFoundError(f"cannot load Dia's processor (tokenizer, feature extractor) from "
                                     f"{folder}: {exc}") from None
        return DiaProcessor(feature_extractor=features, tokenizer=tokenizer, audio_tokenizer=codec)

    def components(self) -> dict:
        inner = self.model.model
        return {"text_encoder": inner.encoder, "decoder": inner.decoder, "codec": self.codec}

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0:
            raise InvalidInputError(f"{self.model_id} (Dia) has no speaking-rate control; leave speed at 1.0")

    # -- voice prompt --------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int,
                      transcript: str | None = None) -> PreparedVoice:
        if sample_rate != self.prompt_sample_rate:
            from edge_runtime.dsp import resample

            audio = resample(audio, sample_rate, self.prompt_sample_rate)
        if not transcript:
            log.warning("Dia clones a voice best with the prompt's transcript; without it the prompt "
                        "audio is continued with the new text only")
        self.calls["encode_prompt"] += 1  # the processor runs the DAC encoder on the clip
        clip = np.asarray(audio, dtype=np.float32)
        inputs = self.processor(text=["[S1]"], audio=[clip], **self.processor_kwargs)  # the text is unused
        ids, mask = inputs["decoder_input_ids"], inputs["decoder_attention_mask"]
        return PreparedVoice(
            tensors={"decoder_input_ids": ids.cpu(), "decoder_attention_mask": mask.cpu()},
            model_id=self.model_id, sample_rate=self.prompt_sample_rate, transcript=transcript,
            # bos + prompt frames: where the generated frames start in the output
            extra={"prompt_frames": int(mask.shape[1] - max(self.delays))})

    # -- synthesis -------------------------------------------------------------------------------
    def max_new_tokens(self, unit: str, prefix_frames: int) -> int:
        """Decoder steps for one sentence: frames its text should need, plus the delay tail, within
        the decoder's positions after the prompt prefix."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S

        frames = math.ceil(len(unit) * DIA_FRAMES_PER_S / SPEECH_CHARS_PER_S * LENGTH_MARGIN)
        tail = max(self.delays) + 1  # the last frame is complete once every delayed channel has it
        room = int(self.config.decoder_config.max_position_embeddings) - prefix_frames
        if room <= tail:
            raise InvalidInputError(f"the voice prompt fills {prefix_frames} of the decoder's "
                                    f"{self.config.decoder_config.max_position_embeddings} positions; use a "
                                    "shorter prompt (limits.max_prompt_seconds)")
        return min(frames + tail, room)

    def _script(self, unit: str, voice: PreparedVoice | None) -> str:
        if voice is not None and voice.transcript:
            return f"[S1] {voice.transcript} [S1] {unit}"
        return f"[S1] {unit}"

    def _inputs(self, units: list[str], voice: PreparedVoice | None) -> tuple[dict, int]:
        """Processor inputs for a batch of sentences (text only: the decoder start is all-BOS and
        the DAC encoder does not run), the stored voice prefix repeated per row, and the frame
        where generated audio starts. One text is not padded; several are padded to the longest
        ("longest": the default pads to the tokenizer's max_length and warns on every call)."""
        scripts = [self._script(unit, voice) for unit in units]
        padding = "longest" if len(scripts) > 1 else False
        inputs = dict(self.processor(text=scripts, padding=padding, **self.processor_kwargs))
        text_cap = int(self.config.encoder_config.max_position_embeddings)
        longest = int(inputs["attention_mask"].sum(dim=1).max())
        if longest > text_cap:
            raise InvalidInputError(f"sentence plus prompt transcript is {longest} bytes; "
                                    f"Dia's text encoder takes at most {text_cap}")
        start = 1  # the BOS frame
        if voice is not None:
            rows = len(scripts)
            inputs["decoder_input_ids"] = voice.tensors["decoder_input_ids"].repeat(rows, 1, 1)
            inputs["decoder_attention_mask"] = voice.tensors["decoder_attention_mask"].repeat(rows, 1)
            start = int(voice.extra["prompt_frames"])
        return inputs, start

    def _options(self, settings: SynthesisSettings, max_new_tokens: int) -> dict:
        options = {"max_new_tokens": max_new_tokens}
        # Sampling follows generation_config.json (CFG, temperature, top-k); noise_scale 0 asks for
        # greedy decoding (reproducible without a seed). Other noise values have no Dia meaning.
        if settings.noise_scale == 0:
            options["do_sample"] = False
        return options

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        inputs, start = self._inputs([unit], voice)
        options = self._options(settings, self.max_new_tokens(unit, start))
        self.generator(settings)
        with torch.inference_mode():
            out = self.model.generate(**{k: v.to(self.device) for k, v in inputs.items()}, **options)
            audio = self.decode(out, start)
        yield audio  # outside inference mode: the consumer runs between our steps

    def synthesize_batch(self, units: list[str], settings: SynthesisSettings,
                         voice: PreparedVoice | None = None) -> list[np.ndarray]:
        """Several sentences in ONE generate() call (same voice and settings): one audio per unit,
        each as long as it would be alone. Every row keeps its own step cap: the EOS that Dia forces
        at the cap is forced per row (a shorter row ends at its own cap, not the batch's longest),
        so with greedy decoding each row's codes are those of the unit generated alone; rows that
        ended early are padded by generate() and cut at their own EOS before the DAC decodes them.
        Seeded sampling draws its random numbers for the whole batch, so it differs from one by one."""
        if not units:
            return []
        if len(units) == 1:
            return [np.concatenate(list(self.synthesize_unit(units[0], settings, voice)))]
        inputs, start = self._inputs(units, voice)
        caps = [self.max_new_tokens(unit, start) for unit in units]
        # decoder frames before generation: the prefix minus its delay padding (what generate() keeps)
        ids = inputs["decoder_input_ids"]
        prefix = int(ids.shape[1] - (ids[:, :, 0] == self.config.decoder_config.pad_token_id).sum(dim=1).max())
        options = self._options(settings, max(caps))
        self.generator(settings)
        with torch.inference_mode(), self._row_caps([max(caps) - cap for cap in caps]):
            out = self.model.generate(**{k: v.to(self.device) for k, v in inputs.items()}, **options)
            return [self.decode(out[row:row + 1, :prefix + cap], start) for row, cap in enumerate(caps)]

    @contextlib.contextmanager
    def _row_caps(self, shortfall: list[int]):
        """During one generate(): Dia's EOS processor forces channel 0's EOS when the sequence
        reaches the (single) max length; make that length per row, `shortfall[row]` steps earlier
        than the batch's. Its comparison `input_ids.shape[1] == max_generation_len` works unchanged
        with a tensor of per-row lengths. transformers' Dia ignores a caller's logits_processor
        list, hence the wrapper around the model's own _get_logits_processor (instance attribute,
        removed afterwards; the runtime's lock keeps forwards one at a time)."""
        from transformers.generation.logits_process import DiaEOSDelayPatternLogitsProcessor

        model = self.model
        build = model._get_logits_processor
        found = []

        def with_row_caps(*args, **kwargs):
            processors = build(*args, **kwargs)
            for processor in processors:
                if isinstance(processor, DiaEOSDelayPatternLogitsProcessor):
                    lengths = torch.tensor([processor.max_generation_len - s for s in shortfall],
                                           device=processor.device)
                    processor.max_generation_len = lengths
                    found.append(processor)
            return processors

        model._get_logits_processor = with_row_caps
        try:
            yield
        finally:
            del model._get_logits_processor
        if not found:
            raise RuntimeError("transformers' Dia generate() no longer uses DiaEOSDelayPatternLogitsProcessor: "
                               "per-row step caps cannot be applied")

    def decode(self, out: torch.Tensor, start: int) -> np.ndarray:
        """Delayed codes (1, steps, channels), prompt included -> float32 audio of the frames after
        `start` that every channel completed (up to EOS, or to the step cap minus the delay tail)."""
        steps, max_delay = out.shape[1], max(self.delays)
        pads = int((out[0, :, 0] == self.config.decoder_config.pad_token_id).sum())
        end = min(steps - pads - 1, steps - max_delay)  # before EOS / before incomplete frames
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        undelay = self.processor.build_indices(bsz=1, seq_len=steps, num_channels=out.shape[2],
                                               delay_pattern=self.delays, revert=True)
        codes = self.processor.apply_audio_delay(out, pad_token_id=-1, bos_token_id=-1, precomputed_idx=undelay)
        codes = codes[:, start:end].transpose(1, 2).long().to(self.device)  # (1, channels, frames)
        audio = self.codec.decode(audio_codes=codes).audio_values
        return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


def dac_layout(config, dtype: torch.dtype):
    """The DAC codec: one non-AR block kept fp32; activations scale with samples per frame, for
    one row at a time (decode() runs a batch's rows one by one) and for the generated frames only
    (the prompt's frames are cut before decoding): the sentence's frames at the planner's speech rate."""
    from edge_runtime.policy.planner import CODEC_ACTIVATION_COPIES, SPEECH_CHARS_PER_S, build_on_meta, describe_model
    from transformers import DacModel

    model = build_on_meta(config, DacModel)
    layout = describe_model(model, {"codec": model}, set(), dtype, ("codec",))
    last_channels = int(config.decoder_hidden_size) // 2 ** len(config.upsampling_ratios)
    width = CODEC_ACTIVATION_COPIES * int(config.hop_length) * max(1, last_channels)
    # stays resident: DiaProcessor calls its encode/decode methods (and its quantizers read their
    # codebooks) outside forward(), where no placement hook can bring streamed weights in
    return layout.replace_component("codec", activation_width=width, batch_cap=1, stays_resident=True,
                                    tokens_per_char=DIA_FRAMES_PER_S / SPEECH_CHARS_PER_S)
