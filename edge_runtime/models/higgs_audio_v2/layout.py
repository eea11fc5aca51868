"""Higgs Audio V2's LM as the planner sees it.

Each HiggsAudioV2DecoderLayer holds self-attention and TWO feed-forward networks with their own norms:
text positions take input_layernorm -> attention -> post_attention_layernorm -> mlp, audio positions the
audio_* norms and audio_mlp. While frames are generated only audio codes go in (generate() drops the text
ids after the prefill and the layer takes its all-audio branch), so the text FFN, its norms and the text
embedding run ONLY in the prompt prefill, once per sentence, while attention, the audio FFN, the audio
embedding and the audio head run once per frame (25 per second of speech).

Blocks must not nest (the streamer hooks a block's forward), so a decoder layer is not a block: its
modules are, in two components:
  lm            per layer: audio_input_layernorm, self_attn, audio_post_attention_layernorm, audio_mlp
                (AR; its Linear layers are the quantizable ones)
  text_ffn      per layer: input_layernorm, post_attention_layernorm, mlp (prefill only, never quantized)
plus text_embedding (prefill only: a lookup of the prompt's ids), audio_embedding and audio_head (the
final norm and the codebook logits; AR, kept in their dtype), and the codec (a sub-model, codec.py).
"""

from __future__ import annotations

import torch

# Attention's and the text FFN's norm names; the audio branch's are the same with an "audio_" prefix.
TEXT_NORMS = ("input_layernorm", "post_attention_layernorm")


def frame_blocks(layer) -> list:
    """A decoder layer's per-frame modules, in execution order."""
    return [layer.audio_input_layernorm, layer.self_attn, layer.audio_post_attention_layernorm, layer.audio_mlp]


def prefill_blocks(layer) -> list:
    """A decoder layer's text-only modules (run on the prompt's text positions only)."""
    return [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp]


def model_layout(model_class, config, dtype: torch.dtype, frame_rate: float, fp32_components=()):
    """The LM's components (module docstring); ``frame_rate`` is its codec's (25 frames/s published)."""
    from edge_runtime.policy.planner import SPEECH_CHARS_PER_S, TEXT_TOKENS_PER_CHAR, build_on_meta, describe_model

    model = build_on_meta(config, model_class)
    inner = model.model
    components = {
        "text_embedding": [inner.embed_tokens],
        "text_ffn": [m for layer in inner.layers for m in prefill_blocks(layer)],
        "audio_embedding": [inner.embed_audio_tokens],
        "lm": [m for layer in inner.layers for m in frame_blocks(layer)],
        "audio_head": [inner.norm, model.audio_lm_head],
    }
    ar = {"audio_embedding", "lm", "audio_head"}
    layout = describe_model(model, components, ar, dtype, tuple(fp32_components))
    layout = layout.replace_component("text_embedding", prefill_only=True)
    layout = layout.replace_component("text_ffn", prefill_only=True)
    layout = layout.replace_component("lm", quantizable=True)
    n_codebooks = int(config.num_codebooks)
    return layout.with_hints(
        # a sentence is its text tokens (prefill) plus its frames, one LM step each
        tokens_per_char=frame_rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
        # a voice prompt: its frames plus its transcript's text tokens
        prompt_tokens_per_s=frame_rate + SPEECH_CHARS_PER_S * TEXT_TOKENS_PER_CHAR,
        max_positions=int(config.max_position_embeddings),
        notes=(f"tokens are audio frames ({frame_rate:g}/s, {n_codebooks} codebooks per LM step) plus the "
               "prompt's text tokens; text_ffn and text_embedding run only in the prompt prefill",))
