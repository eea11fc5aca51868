"""Layouts of transformers models built from a config with no weights, and the speech-rate
heuristics families use to annotate theirs.

The model is instantiated on the meta device (no memory, no download) and split generically into
components. A family refines its own layout in its package (per-frame restarts, codec activation
size, frames per second): the planner knows no family by name. Nothing here loads weights.
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
# Conv codecs decode to samples: at their last stage ~3 tensors of (channels x samples) are alive.
CODEC_ACTIVATION_COPIES = 3


def build_on_meta(config, model_class) -> nn.Module:
    """Instantiate ``model_class(config)`` with every tensor on the meta device."""
    with torch.device("meta"):
        return model_class(config)


def layout_from_config(config, model_class, dtype: torch.dtype | str = torch.bfloat16,
                       fp32_components: Iterable[str] = ()) -> ModelLayout:
    """Describe ``model_class(config)`` without weights, split generically (one component per
    repeated-layer list); a model family refines it in its own package (the planner knows no
    family). ``dtype`` may be a name ("bf16"), e.g. from dtypes.resolve_dtype()."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    model = build_on_meta(config, model_class)
    return _generic(model, config, dtype, tuple(fp32_components))


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
