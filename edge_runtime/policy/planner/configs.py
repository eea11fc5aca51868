"""Layouts for known transformers speech models, built from a config with no weights.

The model is instantiated on the meta device (no memory, no download), split into the
components the planner reasons about, and annotated with the model-specific facts the
generic sizing cannot see (per-frame restarts, codec activation size, frames per second).
transformers is imported by the caller's config/class only; nothing here loads weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edge_runtime.policy.dtypes import torch_dtype
from edge_runtime.policy.planner.layout import ModelLayout
from edge_runtime.policy.planner.sizing import describe_model

# Read speech runs at ~150 words per minute, about 14 characters per second. Used to turn
# the profile's max_text_chars into audio frames; an estimate that errs on the long side.
SPEECH_CHARS_PER_S = 14.0
# A BPE text tokenizer yields roughly one token per 4 characters of English.
TEXT_TOKENS_PER_CHAR = 0.25
# Dia's audio codec is DAC at 44.1 kHz with a hop of 512 samples -> ~86 frames per second.
DIA_FRAMES_PER_S = 44100 / 512
# Pocket TTS's flow head integrates each frame's latent in num_flow_steps Euler steps; the
# released checkpoints' generation config uses 1 (transformers' default too).
POCKET_TTS_FLOW_STEPS = 1
# Conv codecs decode to samples: at their last stage ~3 tensors of (channels x samples) are alive.
CODEC_ACTIVATION_COPIES = 3


def build_on_meta(config, model_class) -> nn.Module:
    """Instantiate ``model_class(config)`` with every tensor on the meta device."""
    with torch.device("meta"):
        return model_class(config)


def layout_from_config(config, model_class, dtype: torch.dtype | str = torch.bfloat16,
                       fp32_components: Iterable[str] = ()) -> ModelLayout:
    """Describe ``model_class(config)`` without weights; known speech models get tailored
    components, anything else the generic split (one component per repeated-layer list).
    ``dtype`` may be a name ("bf16"), e.g. from dtypes.resolve_dtype()."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    model = build_on_meta(config, model_class)
    builder = _BUILDERS.get(model_class.__name__, _generic)
    return builder(model, config, dtype, tuple(fp32_components))


def _csm(model, config, dtype, fp32_components) -> ModelLayout:
    """Sesame CSM: Llama backbone (one step per audio frame), a depth decoder that restarts for
    every frame and emits the remaining codebooks one by one, and the Mimi codec (non-AR)."""
    bb, dd = model.backbone_model, model.depth_decoder
    components = {
        "embeddings": [model.embed_text_tokens, bb.embed_tokens],
        "backbone": [*bb.layers, bb.norm, model.lm_head],
        "depth_decoder": [dd.model.embed_tokens, dd.model.inputs_embeds_projector,
                          *dd.model.layers, dd.model.norm, dd.codebooks_head],
        "codec": model.codec_model,
    }
    # Mimi fails in bf16/fp16 ("expected scalar type Float"), so it stays fp32 (FACTS.md).
    fp32 = {"codec", *fp32_components}
    layout = describe_model(model, components, {"embeddings", "backbone", "depth_decoder"}, dtype, fp32)
    codec = config.codec_config
    frame_rate = float(codec.frame_rate)
    samples_per_frame = int(codec.sampling_rate / frame_rate)
    n_codebooks = int(config.num_codebooks)
    layout = layout.replace_component("depth_decoder", token_cap=n_codebooks,
                                      passes_per_token=max(1, n_codebooks - 1))
    layout = layout.replace_component(
        "codec", activation_width=CODEC_ACTIVATION_COPIES * samples_per_frame * int(codec.num_filters))
    return layout.with_hints(
        tokens_per_char=frame_rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
        prompt_tokens_per_s=frame_rate + SPEECH_CHARS_PER_S * TEXT_TOKENS_PER_CHAR,
        max_positions=int(config.max_position_embeddings),
        notes=("tokens are audio frames plus text tokens of the backbone; the depth decoder runs "
               f"{n_codebooks - 1} passes per frame",))


def _dia(model, config, dtype, fp32_components) -> ModelLayout:
    """Dia: a text encoder run once per request (non-AR) and a decoder emitting one multi-channel
    DAC frame per step (AR). Its DAC codec is a separate DacModel, not part of this layout."""
    enc, dec = model.model.encoder, model.model.decoder
    components = {
        # named as the profiles name it (keep_resident: [text_encoder, ..., decoder])
        "text_encoder": [enc.embedding, *enc.layers, enc.norm],
        "decoder": [dec.embeddings, *dec.layers, dec.norm, model.logits_dense],
    }
    layout = describe_model(model, components, {"decoder"}, dtype, fp32_components)
    text_cap = int(config.encoder_config.max_position_embeddings)  # byte-level text tokens
    layout = layout.replace_component("text_encoder", token_cap=text_cap)
    layout = layout.replace_component("decoder", cross_token_cap=text_cap)
    return layout.with_hints(
        tokens_per_char=DIA_FRAMES_PER_S / SPEECH_CHARS_PER_S,
        prompt_tokens_per_s=DIA_FRAMES_PER_S,
        max_positions=int(config.decoder_config.max_position_embeddings),
        notes=("Dia's DAC codec is a separate DacModel: size it with "
               "layout_from_config(DacConfig(...), DacModel) and budget it too",))


def _dac(model, config, dtype, fp32_components) -> ModelLayout:
    """DAC codec (Dia's vocoder): one non-AR block; activations scale with samples per frame."""
    layout = describe_model(model, {"codec": model}, set(), dtype, fp32_components)
    last_channels = int(config.decoder_hidden_size) // 2 ** len(config.upsampling_ratios)
    width = CODEC_ACTIVATION_COPIES * int(config.hop_length) * max(1, last_channels)
    return layout.replace_component("codec", activation_width=width).with_hints(
        tokens_per_char=DIA_FRAMES_PER_S / SPEECH_CHARS_PER_S, prompt_tokens_per_s=DIA_FRAMES_PER_S)


def _pocket_tts(model, config, dtype, fp32_components) -> ModelLayout:
    """Pocket TTS: one causal transformer over voice-prompt latents, text tokens and generated
    latents (one step per audio frame), whose last hidden state conditions a flow head that turns
    noise into the frame's latent (also once per frame: AR, one position per call). Its audio
    tokenizer (the codec encoding prompts and decoding latents) is a separate
    PocketTTSAudioTokenizerModel held by the processor, not part of this layout."""
    backbone = model.model
    components = {
        # run at every step too: the step's placeholder id, the BOS latent and the previous latent
        "embeddings": [backbone.embed_tokens, backbone.audio_prompt_proj, backbone.audio_latent_proj],
        "decoder": [*backbone.layers, backbone.norm, model.eos_head],
        "flow_head": model.flow_head,  # one block: _no_split_modules keeps it whole
    }
    layout = describe_model(model, components, {"embeddings", "decoder", "flow_head"}, dtype, fp32_components)
    layout = layout.replace_component("flow_head", token_cap=1, passes_per_token=POCKET_TTS_FLOW_STEPS)
    frame_rate = float(config.frame_rate)
    return layout.with_hints(
        # the prompt holds the text tokens, then one position per generated frame
        tokens_per_char=frame_rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
        prompt_tokens_per_s=frame_rate,  # one position per voice-prompt latent; no transcript
        max_positions=int(config.max_position_embeddings),
        notes=("Pocket TTS's audio tokenizer is a separate PocketTTSAudioTokenizerModel the processor "
               "holds (kept fp32 on the execution device): size it with layout_from_config("
               "PocketTTSAudioTokenizerConfig(...), PocketTTSAudioTokenizerModel) and budget it too",))


def _generic(model, config, dtype, fp32_components) -> ModelLayout:
    """Any transformers model: each ModuleList of ``_no_split_modules`` layers is a component;
    embeddings, norms and heads land in ``other``. Decoder-only models are AR throughout;
    encoder-decoders have AR decoder lists only. One token per character unless told otherwise."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    components = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in no_split:
            if not any(name.startswith(c + ".") for c in components):
                components[name] = mod
    if getattr(config, "is_encoder_decoder", False):
        ar = {c for c in components if "decoder" in c}
    elif "CausalLM" in type(model).__name__ or "ForConditionalGeneration" in type(model).__name__:
        ar = set(components)
    else:
        ar = set()
    layout = describe_model(model, components, ar, dtype, fp32_components)
    max_pos = getattr(config, "max_position_embeddings", None)
    return layout.with_hints(max_positions=int(max_pos) if max_pos else None)


_BUILDERS = {
    "CsmForConditionalGeneration": _csm,
    "DiaForConditionalGeneration": _dia,
    "DacModel": _dac,
    "PocketTTSForConditionalGeneration": _pocket_tts,
}
