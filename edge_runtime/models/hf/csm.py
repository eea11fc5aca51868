"""Sesame CSM (CsmForConditionalGeneration): a Llama backbone emits the first codebook of each Mimi
frame, a small depth decoder the other codebooks, and the Mimi codec (`codec_model`) turns frames
into 24 kHz audio. Mimi stays fp32: it fails in half precision.

Voice cloning is CSM's conversation context: a turn of the prompt speaker (its transcript, then its
audio as Mimi frames) before the new turn. transformers' generate() would take the reference as raw
`input_values` and run the Mimi encoder on it on every call; here the reference is encoded once
(prepare_voice) and each sentence's prompt embeddings are built from the cached codes, exactly as
CsmForConditionalGeneration._merge_input_ids_with_input_values does, then passed as inputs_embeds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidInputError
from ...voices import PreparedVoice
from ..base import SynthesisSettings
from .base import HFSpeechModel

# Frame cap per sentence: the planner's speech rate (14 chars/s) with 1.5x head room for slow
# speakers, plus a second for short sentences; a trained model stops earlier at its EOS frame.
LENGTH_MARGIN = 1.5
EXTRA_SECONDS = 1.0
SPEAKER = 0  # the speaker id of both turns: the cloned voice speaks the new sentence too
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def flat_codec_layout(codec) -> None:
    """Register Mimi's parts under the names its checkpoints use. transformers 5 nests them
    (encoder.encoder_seanet.layers, encoder.encoder_transformer, ...) and renames checkpoint keys
    while from_pretrained loads; our backends read tensors by checkpoint name into the skeleton,
    so the skeleton takes the checkpoint's flat layout instead: the same module objects, registered
    as encoder.layers, encoder_transformer, downsample, quantizer, upsample, decoder_transformer,
    decoder.layers, and kept as plain attributes where Mimi's forward looks them up."""
    enc, dec = codec.encoder, codec.decoder

    def unregister(parent, attr):
        module = parent._modules.pop(attr)
        object.__setattr__(parent, attr, module)  # still found by attribute lookup, not a child
        return module

    enc._modules["layers"] = unregister(enc, "encoder_seanet").layers
    dec._modules["layers"] = unregister(dec, "decoder_seanet").layers
    flat = {"encoder": enc, "encoder_transformer": unregister(enc, "encoder_transformer"),
            "downsample": unregister(enc, "downsample"), "quantizer": codec.quantizer,
            "upsample": unregister(dec, "upsample"), "decoder_transformer": unregister(dec, "decoder_transformer"),
            "decoder": dec}
    codec._modules.clear()
    codec._modules.update(flat)  # execution order: encode, quantize, decode


@functools.cache
def checkpoint_layout_class():
    """CsmForConditionalGeneration whose state_dict names are its checkpoint's (same class name:
    the planner picks its CSM layout builder by it)."""
    import transformers

    class CsmForConditionalGeneration(transformers.CsmForConditionalGeneration):
        def __init__(self, config) -> None:
            super().__init__(config)
            if hasattr(self.codec_model.encoder, "encoder_seanet"):  # transformers' nested layout
                flat_codec_layout(self.codec_model)

    return CsmForConditionalGeneration


class CsmSpeechModel(HFSpeechModel):
    model_class = "CsmForConditionalGeneration"
    always_fp32 = ("codec_model",)
    sample_rate = 24000
    prompt_sample_rate = 24000

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        codec = self.config.codec_config
        self.sample_rate = self.prompt_sample_rate = int(codec.sampling_rate)
        self.frame_rate = float(codec.frame_rate)
        self.tokenizer = self.processor.tokenizer
        # sampling defaults of the backbone ("") and the depth decoder: transformers' own, replaced
        # by generation_config.json's in load()
        from transformers import GenerationConfig

        base = GenerationConfig()
        self.sampling = {prefix: {k: getattr(base, k) for k in SAMPLING_KEYS} for prefix in ("", "depth_decoder_")}

    @classmethod
    def transformers_class(cls):
        return checkpoint_layout_class()

    @classmethod
    def load(cls, folder: Path, **kwargs) -> CsmSpeechModel:
        adapter = super().load(folder, **kwargs)
        # base.load builds the skeleton from config.json only; the published sampling defaults
        # (temperature, top-k of the backbone and, prefixed depth_decoder_, of the depth decoder)
        # live in generation_config.json
        path = Path(folder) / "generation_config.json"
        if path.is_file():
            import json

            saved = json.loads(path.read_text(encoding="utf-8"))
            for prefix, keys in adapter.sampling.items():
                keys.update({k: saved[prefix + k] for k in SAMPLING_KEYS if prefix + k in saved})
        return adapter

    def components(self) -> dict:
        m = self.model
        return {"embeddings": [m.embed_text_tokens, m.backbone_model.embed_tokens],
                "backbone": [m.backbone_model, m.lm_head], "depth_decoder": m.depth_decoder,
                "codec": m.codec_model}

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0 or settings.noise_w is not None:
            raise InvalidInputError(f"{self.model_id} (CSM) has no speaking-rate or duration-noise control; "
                                    "leave speed at 1.0 and noise_w unset (noise_scale sets the sampling "
                                    "temperature, 0 = greedy)")

    # -- voice prompt --------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> PreparedVoice:
        if sample_rate != self.prompt_sample_rate:
            from ...prompts import resample

            audio = resample(audio, sample_rate, self.prompt_sample_rate)
        wave = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(1, 1, -1)
        self.calls["encode_prompt"] += 1
        with torch.inference_mode():
            codes = self.model.codec_model.encode(wave.to(self.device)).audio_codes  # (1, codebooks, frames)
        codes = codes[0, : self.config.num_codebooks].transpose(0, 1).contiguous().cpu()  # (frames, codebooks)
        return PreparedVoice(tensors={"codes": codes}, model_id=self.model_id, sample_rate=self.prompt_sample_rate,
                             transcript=transcript or "", extra={"frames": int(codes.shape[0])})

    # -- synthesis -------------------------------------------------------------------------------
    def turn(self, text: str) -> list[int]:
        """One speaker turn's text tokens, as CSM's chat template writes it: bos [speaker]text eos."""
        tok = self.tokenizer
        return tok(f"{tok.bos_token}[{SPEAKER}]{text}{tok.eos_token}", add_special_tokens=False)["input_ids"]

    def prompt_embeds(self, unit: str, voice: PreparedVoice | None) -> torch.Tensor:
        """(1, tokens, hidden) backbone inputs: [prompt turn + its audio frames + audio eos] + new turn.
        Text positions use the text embeddings, audio positions the codebook embeddings of the cached
        frames, the audio-eos position the all-eos frame (as transformers merges them)."""
        cfg, m = self.config, self.model
        ids, codes = self.turn(unit), None
        if voice is not None:
            codes = voice.tensors["codes"]
            codes = torch.as_tensor(codes).to(self.device, torch.long)
            ids = [*self.turn(voice.transcript or ""), *[cfg.audio_token_id] * codes.shape[0],
                   cfg.audio_eos_token_id, *ids]
        ids = torch.tensor([ids], device=self.device)
        embeds = m.embed_text_tokens(ids)
        if codes is not None:
            embeds[ids == cfg.audio_token_id] = m.backbone_model.embed_tokens(codes[None])[0].to(embeds.dtype)
            eos = torch.full((1, 1, cfg.num_codebooks), cfg.codebook_eos_token_id, device=self.device)
            embeds[ids == cfg.audio_eos_token_id] = m.backbone_model.embed_tokens(eos)[0].to(embeds.dtype)
        return embeds

    def max_new_tokens(self, unit: str, prompt_tokens: int) -> int:
        """Frames for one sentence: what its text should need with head room, within the backbone's
        positions after the prompt."""
        from ...planner.configs import SPEECH_CHARS_PER_S

        frames = math.ceil(self.frame_rate * (len(unit) / SPEECH_CHARS_PER_S * LENGTH_MARGIN + EXTRA_SECONDS))
        room = int(self.config.max_position_embeddings) - prompt_tokens
        if room < 1:
            raise InvalidInputError(f"the voice prompt and sentence fill {prompt_tokens} of the backbone's "
                                    f"{self.config.max_position_embeddings} positions; use a shorter prompt "
                                    "(limits.max_prompt_seconds) or shorter sentences")
        return min(frames, room)

    def generate_options(self, settings: SynthesisSettings) -> dict:
        """Sampling of both stages, all keys every call: CSM's generate() writes depth_decoder_*
        options into the depth decoder's own generation config, where they would persist."""
        options = {}
        for prefix, defaults in self.sampling.items():
            chosen = dict(defaults)
            if settings.noise_scale == 0:  # greedy: reproducible without a seed
                chosen = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
            elif settings.noise_scale is not None:
                chosen.update(do_sample=True, temperature=float(settings.noise_scale))
            options.update({prefix + k: v for k, v in chosen.items()})
        return options

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: PreparedVoice | None = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        self.generator(settings)
        with torch.inference_mode():
            embeds = self.prompt_embeds(unit, voice)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            audio = self.model.generate(inputs_embeds=embeds, attention_mask=mask, output_audio=True,
                                        max_new_tokens=self.max_new_tokens(unit, embeds.shape[1]),
                                        **self.generate_options(settings))[0]
            audio = audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy()
        yield audio.astype(np.float32, copy=False)  # one chunk per sentence, also when streaming
