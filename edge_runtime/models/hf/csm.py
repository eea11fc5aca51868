"""Sesame CSM (CsmForConditionalGeneration): a Llama backbone emits the first codebook of each Mimi
frame, a small depth decoder the other codebooks, and the Mimi codec (`codec_model`) turns frames
into 24 kHz audio. Mimi stays fp32: it fails in half precision.

Voice cloning is CSM's conversation context: a turn of the prompt speaker (its transcript, then its
audio as Mimi frames) before the new turn. transformers' generate() would take the reference as raw
`input_values` and run the Mimi encoder on it on every call; here the reference is encoded once
(prepare_voice) and each sentence's prompt embeddings are built from the cached codes, exactly as
CsmForConditionalGeneration._merge_input_ids_with_input_values does, then passed as inputs_embeds.

Two transformers details are adapted where the model is built (checkpoint_layout_class):
* Mimi's checkpoints keep its original flat names (codec_model.encoder.layers.*,
  codec_model.encoder_transformer.*); transformers 5 nests the modules and renames keys inside
  from_pretrained. Our backends read tensors by checkpoint name: the skeleton takes the flat layout.
* Mimi's encode/decode (and its quantizer's) are methods, which placement hooks (wrapping forward)
  would not see: they are routed through forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError
from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.models.base import ModelSource, Placer, SynthesisSettings
from edge_runtime.models.hf.base import HFSpeechModel
from edge_runtime.models.registry import register

# Frame cap per sentence: the planner's speech rate (14 chars/s) with 1.5x head room for slow
# speakers, plus a second for short sentences; a trained model stops earlier at its EOS frame.
LENGTH_MARGIN = 1.5
EXTRA_SECONDS = 1.0
SPEAKER = 0  # the speaker id of both turns: the cloned voice speaks the new sentence too
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")
FLAT_NAMES = ("encoder_transformer", "downsample", "upsample", "decoder_transformer")


@functools.cache
def _routed_class(cls, methods: tuple[str, ...], hidden: tuple[str, ...]):
    def forward(self, *args, _method: str = "forward", **kwargs):
        return getattr(cls, _method)(self, *args, **kwargs)

    def routed(name):
        return lambda self, *args, **kwargs: self(*args, _method=name, **kwargs)

    namespace = {"forward": forward, **{m: routed(m) for m in methods}, **dict.fromkeys(hidden)}
    return type(cls.__name__, (cls,), namespace)


def route_through_forward(module, methods: tuple[str, ...], hidden: tuple[str, ...] = ()) -> None:
    """Make module.<method>() run as module(..., _method=<method>), so hooks on forward run around
    it. `hidden`: class attributes (deprecation-warning properties) shadowed by plain ones."""
    module.__class__ = _routed_class(type(module), methods, hidden)


def flat_codec_layout(codec) -> None:
    """Register Mimi's parts under its checkpoint's names (encoder.layers, encoder_transformer,
    downsample, quantizer, upsample, decoder_transformer, decoder.layers): the same module objects,
    kept as plain attributes where Mimi's forward looks them up."""
    enc, dec = codec.encoder, codec.decoder

    def unregister(parent, attr):
        module = parent._modules.pop(attr)
        object.__setattr__(parent, attr, module)  # still found by attribute lookup, not a child
        return module

    enc._modules["layers"] = unregister(enc, "encoder_seanet").layers
    dec._modules["layers"] = unregister(dec, "decoder_seanet").layers
    flat = {"encoder": enc, "encoder_transformer": unregister(enc, "encoder_transformer"),
            "downsample": unregister(enc, "downsample"), "quantizer": codec.quantizer,
            "upsample": unregister(dec, "upsample"),
            "decoder_transformer": unregister(dec, "decoder_transformer"), "decoder": dec}
    codec._modules.clear()
    codec._modules.update(flat)  # execution order: encode, quantize, decode
    for name in FLAT_NAMES:  # MimiModel's deprecated properties of these names, as plain attributes
        object.__setattr__(codec, name, flat[name])


@functools.cache
def checkpoint_layout_class():
    """CsmForConditionalGeneration as our backends load it (see the module docstring)."""
    import transformers

    class CsmForConditionalGeneration(transformers.CsmForConditionalGeneration):
        def __init__(self, config) -> None:
            super().__init__(config)
            codec = self.codec_model
            nested = hasattr(codec.encoder, "encoder_seanet")
            route_through_forward(codec, ("encode", "decode"), FLAT_NAMES if nested else ())
            route_through_forward(codec.quantizer, ("encode", "decode"))
            if nested:
                flat_codec_layout(codec)

    return CsmForConditionalGeneration


@register
class CsmSpeechModel(HFSpeechModel):
    family = "csm"
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
        # sampling of the backbone ("") and of the depth decoder: None (transformers' default) until
        # load() reads generation_config.json
        self.sampling = {prefix: dict.fromkeys(SAMPLING_KEYS) for prefix in ("", "depth_decoder_")}

    @classmethod
    def transformers_class(cls):
        return checkpoint_layout_class()

    @classmethod
    def model_layout(cls, config, dtype: torch.dtype, fp32_components=()):
        """Llama backbone (one step per audio frame), a depth decoder that restarts for every frame
        and emits the remaining codebooks one by one, and the Mimi codec (non-AR, fp32: it fails in
        bf16/fp16). The codec is listed as its parts, not one block: a codec that is one non-AR
        block never streams (it needs as much VRAM in flight as resident); its parts can, leaving
        the VRAM to AR blocks. Parts never nest (a streamed block running inside another would
        evict it): the SEANet stacks go layer by layer, since their wrappers (codec_model.encoder /
        .decoder) also run the transformers and the resampling convs."""
        from edge_runtime.policy.planner import (CODEC_ACTIVATION_COPIES, SPEECH_CHARS_PER_S,
                                                 TEXT_TOKENS_PER_CHAR, build_on_meta, describe_model)

        model = build_on_meta(config, cls.transformers_class())
        bb, dd = model.backbone_model, model.depth_decoder
        components = {
            "embeddings": [model.embed_text_tokens, bb.embed_tokens],
            "backbone": [*bb.layers, bb.norm, model.lm_head],
            "depth_decoder": [dd.model.embed_tokens, dd.model.inputs_embeds_projector,
                              *dd.model.layers, dd.model.norm, dd.codebooks_head],
            "codec": model.codec_model,
        }
        fp32 = {"codec", *cls.fp32_modules(fp32_components)}
        layout = describe_model(model, components, {"embeddings", "backbone", "depth_decoder"}, dtype, fp32)
        codec_config = config.codec_config
        frame_rate = float(codec_config.frame_rate)
        samples_per_frame = int(codec_config.sampling_rate / frame_rate)
        n_codebooks = int(config.num_codebooks)
        layout = layout.replace_component("depth_decoder", token_cap=n_codebooks,
                                          passes_per_token=max(1, n_codebooks - 1))
        whole = dataclasses.replace(layout.component("codec"), activation_width=(
            CODEC_ACTIVATION_COPIES * samples_per_frame * int(codec_config.num_filters)))
        layout = layout.with_hints(
            tokens_per_char=frame_rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
            prompt_tokens_per_s=frame_rate + SPEECH_CHARS_PER_S * TEXT_TOKENS_PER_CHAR,
            max_positions=int(config.max_position_embeddings),
            notes=("tokens are audio frames plus text tokens of the backbone; the depth decoder runs "
                   f"{n_codebooks - 1} passes per frame",))
        codec = model.codec_model
        if "encoder_transformer" not in codec._modules:  # not the flat layout: keep one block
            return layout.replace_component("codec", activation_width=whole.activation_width)
        middle = ("encoder_transformer", "downsample", "quantizer", "upsample", "decoder_transformer")
        parts = [*codec.encoder.layers, *(codec._modules[n] for n in middle), *codec.decoder.layers]
        parts = [p for p in parts if any(True for _ in p.parameters())]  # activations hold no weights
        split = describe_model(codec, {"codec": parts}, (), dtype, ("codec",)).component("codec")
        split = dataclasses.replace(split, activation_width=whole.activation_width, blocks=tuple(
            dataclasses.replace(b, name=f"codec_model.{b.name}") for b in split.blocks))
        comps = tuple(split if c.name == "codec" else c for c in layout.components)
        return dataclasses.replace(layout, components=comps)

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> CsmSpeechModel:
        adapter = super().load(source, placer)
        folder = source.path
        # the published sampling settings, the depth decoder's as depth_decoder_* keys, which
        # GenerationConfig.from_pretrained (base.load) drops: read the file itself
        path = Path(folder) / "generation_config.json"
        if path.is_file():
            import json

            saved = json.loads(path.read_text(encoding="utf-8"))
            for prefix, keys in adapter.sampling.items():
                keys.update({k: saved[prefix + k] for k in SAMPLING_KEYS if prefix + k in saved})
        return adapter

    def components(self) -> dict:
        m = self.model  # the backbone holds the codebook embeddings; lm_head emits codebook 0
        return {"text_embeddings": m.embed_text_tokens, "backbone": m.backbone_model,
                "lm_head": m.lm_head, "depth_decoder": m.depth_decoder, "codec": m.codec_model}

    def check_settings(self, settings: SynthesisSettings) -> None:
        super().check_settings(settings)
        if settings.speed != 1.0 or settings.noise_w is not None:
            raise InvalidInputError(f"{self.model_id} (CSM) has no speaking-rate or duration-noise control; "
                                    "leave speed at 1.0 and noise_w unset (noise_scale sets the sampling "
                                    "temperature, 0 = greedy)")

    # -- voice prompt --------------------------------------------------------------------------
    def prepare_voice(self, audio: np.ndarray, sample_rate: int,
                      transcript: str | None = None) -> PreparedVoice:
        if sample_rate != self.prompt_sample_rate:
            from edge_runtime.dsp import resample

            audio = resample(audio, sample_rate, self.prompt_sample_rate)
        wave = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(1, 1, -1).to(self.device)
        self.calls["encode_prompt"] += 1
        with torch.inference_mode():
            codes = self.model.codec_model.encode(wave).audio_codes  # (1, codebooks, frames)
        codes = codes[0, : self.config.num_codebooks].T.contiguous().cpu()  # (frames, codebooks)
        return PreparedVoice(tensors={"codes": codes}, model_id=self.model_id,
                             sample_rate=self.prompt_sample_rate, transcript=transcript or "",
                             extra={"frames": int(codes.shape[0])})

    # -- synthesis -------------------------------------------------------------------------------
    def turn(self, text: str) -> list[int]:
        """One speaker turn's text tokens, as CSM's chat template writes it: bos [speaker]text eos."""
        tok = self.tokenizer
        return tok(f"{tok.bos_token}[{SPEAKER}]{text}{tok.eos_token}", add_special_tokens=False)["input_ids"]

    def prompt_embeds(self, unit: str, voice: PreparedVoice | None) -> torch.Tensor:
        """(1, tokens, hidden) backbone inputs: [prompt turn, its audio frames, audio eos] + new turn.
        Text positions take the text embeddings, audio positions the codebook embeddings of the
        cached frames, the audio-eos position the all-eos frame's (as transformers merges them)."""
        cfg, m = self.config, self.model
        ids, codes = self.turn(unit), None
        if voice is not None:
            codes = torch.as_tensor(voice.tensors["codes"]).to(self.device, torch.long)
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
        """Frames for one sentence: what its text should need, with head room, within the
        backbone's positions left after the prompt."""
        from edge_runtime.policy.planner import SPEECH_CHARS_PER_S

        frames = math.ceil(self.frame_rate * (len(unit) / SPEECH_CHARS_PER_S * LENGTH_MARGIN + EXTRA_SECONDS))
        room = int(self.config.max_position_embeddings) - prompt_tokens
        if room < 1:
            raise InvalidInputError(f"the voice prompt and sentence fill {prompt_tokens} of the backbone's "
                                    f"{self.config.max_position_embeddings} positions; use a shorter prompt "
                                    "(limits.max_prompt_seconds) or shorter sentences")
        return min(frames, room)

    def generate_options(self, settings: SynthesisSettings) -> dict:
        """Sampling of both stages, every key every call: CSM's generate() writes depth_decoder_*
        options into the depth decoder's own generation config, where they would persist."""
        options = {}
        for prefix, defaults in self.sampling.items():
            chosen = dict(defaults)
            if settings.noise_scale == 0:  # greedy: reproducible without a seed
                chosen = dict.fromkeys(SAMPLING_KEYS) | {"do_sample": False}
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
            codes = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                        max_new_tokens=self.max_new_tokens(unit, embeds.shape[1]),
                                        **self.generate_options(settings))  # (1, frames, codebooks)
            audio = self.decode(codes[0])
        yield audio  # one chunk per sentence, also when streaming

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Frames up to the first all-eos frame -> float32 audio (generate's output_audio, inlined
        to cope with an eos in the very first frame)."""
        eos = (codes == self.config.codebook_eos_token_id).all(dim=-1).nonzero()
        codes = codes[: int(eos.min()) if eos.numel() else codes.shape[0]]
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        audio = self.model.codec_model.decode(codes.T[None].to(self.device)).audio_values
        return audio.reshape(-1).float().clamp(-1.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
