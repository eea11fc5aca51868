"""Measure a model's blocks without touching real memory.

Works on models built under ``torch.device("meta")`` or accelerate's ``init_empty_weights()``:
only shapes, dtypes and module structure are read. Sizes are converted to the *target* dtype
because a meta model is usually instantiated in fp32 while it will run in bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import nn

from edge_runtime.policy.planner.layout import Block, ComponentLayout, ModelLayout

# Activation heuristic: at a transformer layer's peak a few tensors of its widest projection are
# alive per token (input, projection output, activation-function output, residual). 4 is an
# estimate, not a measurement; the memory governor's telemetry is what checks it.
ACTIVATION_FACTOR = 4
OTHER = "other"  # component collecting whatever the caller's components did not cover


def describe_model(
    model: nn.Module,
    components: Mapping[str, nn.Module | Iterable[nn.Module]],
    autoregressive: Iterable[str],
    dtype: torch.dtype,
    fp32_components: Iterable[str] = (),
) -> ModelLayout:
    """Per component, its blocks and their bytes in ``dtype``.

    A component given as a list / ModuleList has one block per element; a single module is one
    block. Parameters and buffers the components do not cover are collected into an extra
    component ``"other"`` (autoregressive when any listed component is), so the layout always
    accounts for every tensor of the model. Tied tensors count once, in the first block using them.
    """
    autoregressive = set(autoregressive)
    fp32 = set(fp32_components)
    unknown = autoregressive - set(components) - {OTHER}
    if unknown:
        raise ValueError(f"autoregressive names unknown components: {sorted(unknown)}")

    module_names = {id(m): n for n, m in model.named_modules()}
    specs: list[tuple[str, int, str, nn.Module]] = []  # (component, index, name, module)
    for comp, value in components.items():
        mods = list(value) if isinstance(value, (list, tuple, nn.ModuleList)) else [value]
        for i, mod in enumerate(mods):
            if id(mod) not in module_names:
                raise ValueError(f"component {comp!r} block {i} is not a submodule of the model")
            specs.append((comp, i, module_names[id(mod)], mod))
    _check_disjoint([s[2] for s in specs])

    block_names = [s[2] for s in specs]
    tensors = _named_tensors(model)
    owners: dict[str, list[tuple[str, torch.Tensor]]] = {}  # block name -> its tensors
    leftovers: dict[str, list[tuple[str, torch.Tensor]]] = {}  # leftover key -> its tensors
    for tname, t in tensors:
        owner = _owning_block(tname, block_names)
        if owner is not None:
            owners.setdefault(owner, []).append((tname, t))
        else:
            leftovers.setdefault(_leftover_key(tname, block_names), []).append((tname, t))

    modules = dict(model.named_modules())
    any_ar = bool(autoregressive & set(components))
    all_specs = list(specs)
    for i, key in enumerate(leftovers):
        all_specs.append((OTHER, i, key, modules.get(key)))  # None for a bare parameter
    if leftovers and (any_ar or OTHER in autoregressive):
        autoregressive.add(OTHER)
    owners.update(leftovers)

    claimed: dict[int, str] = {}  # id(tensor) -> first block that counted it
    sharers: dict[str, set[str]] = {}
    blocks_by_comp: dict[str, list[Block]] = {}
    for comp, idx, name, mod in all_specs:
        is_fp32 = comp in fp32 or any(name == p or name.startswith(p + ".") for p in fp32)
        n_bytes = n_params = 0
        for tname, t in owners.get(name, []):
            first = claimed.get(id(t))
            if first is not None:  # seen before: tied (same block or another), count once
                if first != name:
                    sharers.setdefault(first, set()).add(name)
                    sharers.setdefault(name, set()).add(first)
                continue
            claimed[id(t)] = name
            n_bytes += t.numel() * _element_bytes(t, dtype, is_fp32)
            if isinstance(t, nn.Parameter):
                n_params += t.numel()
        if mod is not None:
            kv, cross_kv, width, attn = _inspect(mod)
            compute = _compute_params(mod)
            linears = tuple((m.out_features, m.in_features) for m in mod.modules() if isinstance(m, nn.Linear))
        else:  # a bare parameter owned by a module that also holds blocks
            kv = cross_kv = width = 0
            attn, compute, linears = False, n_params, ()
        ar = comp in autoregressive
        blocks_by_comp.setdefault(comp, []).append(Block(
            name=name, component=comp, index=idx, bytes=n_bytes, params=n_params,
            autoregressive=ar, compute_bytes=4 if is_fp32 else _itemsize(dtype),
            kv_elems_per_token=kv if ar else 0, cross_kv_elems_per_token=cross_kv if ar else 0,
            compute_params=compute, width=width, has_attention=attn, linear_shapes=linears))

    comps = []
    for comp, blocks in blocks_by_comp.items():
        blocks = [_with_ties(b, sharers) for b in blocks]
        ar = comp in autoregressive
        comps.append(ComponentLayout(
            name=comp, autoregressive=ar, blocks=tuple(blocks),
            activation_width=_activation_width(blocks, ar),
            fp32=comp in fp32))
    return ModelLayout(model_name=type(model).__name__, dtype=dtype, components=tuple(comps))


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # remove_duplicate=False so a tied tensor is seen under every name that uses it
    out = list(model.named_parameters(remove_duplicate=False))
    out += [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]
    return out


def _check_disjoint(names: list[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"module {n!r} is listed twice")
        seen.add(n)
    for a in names:
        for b in names:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise ValueError(f"block {b!r} lies inside block {a!r}; blocks must not overlap")


def _owning_block(tensor_name: str, block_names: list[str]) -> str | None:
    for b in block_names:
        if b == "" or tensor_name.startswith(b + "."):
            return b
    return None


def _leftover_key(tensor_name: str, block_names: list[str]) -> str:
    """Largest module holding this tensor and no block; the tensor's own name if its module
    also holds blocks (a device_map may name single parameters)."""
    parts = tensor_name.split(".")
    key = tensor_name
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if any(b == prefix or b.startswith(prefix + ".") for b in block_names):
            break
        key = prefix
    return key


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _element_bytes(t: torch.Tensor, dtype: torch.dtype, is_fp32: bool) -> int:
    # Integer/bool tensors (offsets, counters) keep their size whatever the compute dtype.
    if not t.is_floating_point():
        return t.element_size()
    return 4 if is_fp32 else _itemsize(dtype)


def _inspect(mod: nn.Module) -> tuple[int, int, int, bool]:
    """K/V elements per token (self, cross), widest output, and whether it holds attention.

    Attention is recognised by the ``k_proj`` / ``v_proj`` names transformers uses (and
    nn.MultiheadAttention); a fused qkv projection is not recognised (its KV is then missed).
    """
    kv = cross = width = 0
    attn = False
    for name, m in mod.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear):
            width = max(width, m.out_features)
            if leaf in ("k_proj", "v_proj"):
                attn = True
                if "cross" in name:
                    cross += m.out_features
                else:
                    kv += m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            width = max(width, m.out_channels)
        elif isinstance(m, nn.Embedding):
            width = max(width, m.embedding_dim)
        elif isinstance(m, nn.MultiheadAttention):
            attn = True
            kv += m.kdim + m.vdim
            width = max(width, m.embed_dim)
    return kv, cross, width, attn


def _compute_params(mod: nn.Module) -> int:
    # Embedding tables are gathered, not multiplied; tied weights still compute where they're used.
    return sum(p.numel() for m in mod.modules() if not isinstance(m, nn.Embedding)
               for p in m.parameters(recurse=False))


def _activation_width(blocks: list[Block], autoregressive: bool) -> int:
    # Transformer layers set the peak. An AR component without layers holds embeddings, norms
    # and heads: generate() computes logits for the newest position only, so count nothing.
    attn = [b.width for b in blocks if b.has_attention]
    if attn:
        return ACTIVATION_FACTOR * max(attn)
    if autoregressive:
        return 0
    return ACTIVATION_FACTOR * max((b.width for b in blocks), default=0)


def _with_ties(block: Block, sharers: dict[str, set[str]]) -> Block:
    tied = sharers.get(block.name)
    if not tied:
        return block
    return replace(block, tied_with=tuple(sorted(tied)))
