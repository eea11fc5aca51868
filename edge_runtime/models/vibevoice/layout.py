"""VibeVoice's layout on the meta device: which parts run per generated frame, which once.

Per frame (autoregressive): the Qwen2 LM's decoder layers (quantizable; two passes per frame: the
prompt branch and the unconditional branch of the diffusion guidance), its final norm and lm_head
(quantizable too when untied, as VibeVoice-Large's is), the token embedding (a lookup for the next
step's input), the diffusion head (``num_diffusion_steps`` passes, both guidance branches in one
batch), the streaming acoustic decoder and the semantic encoder (one 3200-sample frame each), and
the two connectors. Once per voice: the acoustic encoder (its latents are cached in the
PreparedVoice). Kept fp32: that encoder and the two latent factors (VibeVoiceSpeechModel.always_fp32).

Blocks never nest: each tokenizer stack (the acoustic encoder and decoder inside
``model.audio_tower``, the semantic encoder) is split into its convs and ConvNeXt layers, which its
forward() calls as modules (encode()/decode() call that forward), so placement hooks see them.
"""

from __future__ import annotations

import math

import torch

# The acoustic tokenizer turns 3200 samples at 24 kHz into one latent: 7.5 frames per second.
SAMPLE_RATE = 24000
AUTOREGRESSIVE = ("embeddings", "lm", "lm_head", "connectors", "diffusion_head", "acoustic_decoder",
                  "semantic_encoder")
# LM forward passes per generated frame: the prompt branch and the negative (unconditional) branch
# the diffusion guidance needs. transformers' generic CFG logits processor would add a third
# (model.py removes it).
LM_PASSES_PER_FRAME = 2
DEFAULT_DIFFUSION_STEPS = 10  # VibeVoiceGenerationMixin's default when the generation config has none
# The acoustic encoder reads a voice prompt in one pass up to this many seconds (bit-identical to
# transformers' own encoding), longer prompts in chunks of it through its causal conv cache: its
# activations never exceed this much audio, whatever limits.max_prompt_seconds allows.
ENCODE_CHUNK_SECONDS = 10


def frame_rate(config) -> float:
    return SAMPLE_RATE / math.prod(config.audio_config.downsampling_ratios)


def encode_chunk_frames(config) -> int:
    return math.ceil(ENCODE_CHUNK_SECONDS * frame_rate(config))


def conv_activation_width(tokenizer_config) -> int:
    """Elements alive per 3200-sample frame in a tokenizer stack: at its full-rate stage a few
    tensors of num_filters x ffn_expansion channels per sample (the stages below trade channels for
    samples, so the first stage sets the peak)."""
    from edge_runtime.policy.planner import CODEC_ACTIVATION_COPIES

    hop = math.prod(tokenizer_config.downsampling_ratios)
    return CODEC_ACTIVATION_COPIES * hop * int(tokenizer_config.num_filters) * int(tokenizer_config.ffn_expansion)


def conv_stack_blocks(stack) -> list:
    """A tokenizer encoder/decoder as blocks: its stem conv, every ConvNeXt layer, each stage's
    (transposed) strided conv and its head conv. Each is called as a module by its parent's
    forward, so placement hooks see it; the biggest (a 2048-channel ConvNeXt layer of the published
    stacks, 34M parameters) is ~8% of the stack, which a small card can stream through."""
    blocks = [stack.stem.conv, *stack.stem.stage]
    for layer in stack.conv_layers:
        blocks += [getattr(layer, "conv", None) or layer.convtr, *layer.stage]
    blocks.append(stack.head)
    return blocks


def model_layout(model_class, config, dtype: torch.dtype, fp32_modules: tuple[str, ...],
                 diffusion_steps: int = DEFAULT_DIFFUSION_STEPS):
    """Components and block sizes of ``model_class(config)`` built on meta (no weights)."""
    from edge_runtime.policy.planner import SPEECH_CHARS_PER_S, TEXT_TOKENS_PER_CHAR, build_on_meta, describe_model

    model = build_on_meta(config, model_class)
    inner, lm = model.model, model.model.language_model
    components = {
        "acoustic_encoder": conv_stack_blocks(inner.audio_tower.encoder),
        "embeddings": lm.embed_tokens,
        "lm": lm.layers,
        "lm_head": [lm.norm, model.lm_head],
        "connectors": [inner.multi_modal_projector, inner.semantic_connector],
        "diffusion_head": inner.diffusion_head,
        "acoustic_decoder": conv_stack_blocks(inner.audio_tower.decoder),
        "semantic_encoder": conv_stack_blocks(inner.semantic_tokenizer_encoder),
    }
    fp32 = {c for c, m in components.items() if _is_fp32(model, m, fp32_modules)}
    layout = describe_model(model, components, AUTOREGRESSIVE, dtype, (*fp32, *fp32_modules))
    rate = frame_rate(config)
    layout = layout.replace_component("lm", quantizable=True, passes_per_token=LM_PASSES_PER_FRAME)
    layout = layout.replace_component("lm_head", passes_per_token=LM_PASSES_PER_FRAME)
    if not config.text_config.tie_word_embeddings:
        # an untied lm_head (VibeVoice-Large: 545M, 1 GiB) is the LM's own Linear, run twice per
        # frame; a tied one shares its table with the embedding lookup and stays as it is
        layout = layout.replace_component("lm_head", quantizable=True)
    # each diffusion step runs both guidance branches on one frame's condition (a batch of 2)
    head_width = 4 * int(config.diffusion_head_config.intermediate_size)
    layout = layout.replace_component("diffusion_head", token_cap=2, passes_per_token=max(1, diffusion_steps),
                                      activation_width=head_width)
    # the streaming decoder and the semantic encoder see one frame per call (their conv caches are
    # a few frames of state), whatever the sentence length
    for name, part in (("acoustic_decoder", config.audio_config), ("semantic_encoder", config.semantic_model_config)):
        layout = layout.replace_component(name, token_cap=1, activation_width=conv_activation_width(part))
    # the encoder reads one voice prompt (one row) of at most ENCODE_CHUNK_SECONDS at a time
    layout = layout.replace_component("acoustic_encoder", batch_cap=1, token_cap=encode_chunk_frames(config),
                                      activation_width=conv_activation_width(config.audio_config))
    return layout.with_hints(
        tokens_per_char=rate / SPEECH_CHARS_PER_S + TEXT_TOKENS_PER_CHAR,
        prompt_tokens_per_s=rate,
        max_positions=int(config.text_config.max_position_embeddings),
        notes=(f"{rate:g} frames/s; per frame the LM runs {LM_PASSES_PER_FRAME} passes (prompt and "
               f"unconditional branch) and the diffusion head {diffusion_steps} steps on both branches",))


def _is_fp32(model, module, fp32_modules) -> bool:
    names = {id(m): n for n, m in model.named_modules()}
    mods = module if isinstance(module, (list, tuple, torch.nn.ModuleList)) else [module]
    return all(any(names[id(m)] == p or names[id(m)].startswith(p + ".") for p in fp32_modules) for m in mods)
