"""What the planner knows about a model: components, their blocks and each block's size.

A *block* is the unit the planner places (one transformer layer, an embedding, a codec).
Its ``name`` is the qualified module name inside the model (or a parameter name for a
parameter owned directly by a module that also contains blocks), so a plan translates
straight into an accelerate ``device_map``. Numbers are for the target dtype, not the
dtype the model happens to be instantiated in (usually meta / fp32).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

GIB = 1024**3


def gib(n_bytes: float) -> float:
    """Bytes -> GiB, for messages and tables."""
    return n_bytes / GIB


@dataclass(frozen=True)
class Block:
    name: str  # qualified module (or parameter) name in the model
    component: str
    index: int  # position inside its component
    bytes: int  # parameters + buffers in the target dtype (tied tensors counted once)
    params: int  # parameter count (tied counted once)
    autoregressive: bool
    compute_bytes: int  # bytes per element this block computes in (2 for bf16, 4 for fp32 parts)
    kv_elems_per_token: int = 0  # self-attention K+V elements per token per sequence (AR only)
    cross_kv_elems_per_token: int = 0  # cross-attention K+V elements per encoder token
    # Parameters that do per-token arithmetic (every non-embedding parameter, tied ones included):
    # an embedding lookup reads one row, so tables cost no compute in the FLOP estimate.
    compute_params: int = 0
    width: int = 0  # widest Linear/Conv/Embedding output in the block (activation heuristic)
    has_attention: bool = False
    tied_with: tuple[str, ...] = ()  # other blocks sharing a parameter with this one
    # The sub-model (its own checkpoint) holding the block: "" for the main one. Blocks of another
    # sub-model are named "<submodel>:<module name inside it>", unique across the whole layout.
    submodel: str = ""
    # (out_features, in_features) of each nn.Linear in the block: what weight-only quantization of a
    # ``quantizable`` component stores (policy/quantization.py sizes it).
    linear_shapes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ComponentLayout:
    name: str
    autoregressive: bool
    blocks: tuple[Block, ...]
    # Elements alive per token at this component's activation peak (already includes the
    # "a few copies" factor); set by layout_from_config where the generic guess is poor (codecs).
    activation_width: int = 0
    # Sequence length this component sees is min(request tokens, token_cap): e.g. CSM's depth
    # decoder restarts every frame (32 codebooks), Dia's encoder reads at most 1024 text bytes.
    token_cap: int | None = None
    cross_token_cap: int | None = None
    # Forward passes per request token: CSM's depth decoder runs once per codebook per frame.
    passes_per_token: int = 1
    fp32: bool = False
    # Runs on the prompt only, once per request (Higgs's text FFNs): like a non-AR block its weights
    # cross once per request, however many frames are generated.
    prefill_only: bool = False
    # Rows it runs at once whatever the batch (a codec decoding a batch row by row: 1); None = all.
    batch_cap: int | None = None
    # Its model uses these weights outside forward() (a codec's encode/decode methods), where
    # placement hooks cannot bring them in: the plan keeps it resident, like keep_resident.
    stays_resident: bool = False
    # Tokens per character of the sentence when this component sees only the generated part (a codec
    # decoding the new frames, not the voice prompt's); None: it sees the whole request sequence.
    tokens_per_char: float | None = None
    # Its nn.Linear weights may be stored int8/int4 (a family marks its LM decoder layers only: codecs,
    # connectors, diffusion and audio heads stay in their dtype).
    quantizable: bool = False

    @property
    def kind(self) -> str:
        """autoregressive (once per generated token), prefill (once, on the prompt) or once."""
        return "autoregressive" if self.autoregressive else "prefill" if self.prefill_only else "once"

    @property
    def bytes(self) -> int:
        return sum(b.bytes for b in self.blocks)

    def tokens(self, request_tokens: int, chars: int | None = None) -> int:
        """Sequence length this component sees for a request of ``request_tokens`` tokens made from
        a sentence of ``chars`` characters (when known)."""
        if self.tokens_per_char is not None and chars is not None:
            request_tokens = min(request_tokens, max(1, math.ceil(chars * self.tokens_per_char)))
        return request_tokens if self.token_cap is None else min(request_tokens, self.token_cap)

    def cross_tokens(self, request_tokens: int) -> int:
        cap = self.cross_token_cap
        return request_tokens if cap is None else min(request_tokens, cap)


@dataclass(frozen=True)
class ModelLayout:
    model_name: str
    dtype: torch.dtype
    components: tuple[ComponentLayout, ...]
    # Heuristics turning the profile's text/prompt limits into a sequence length (see budget.py).
    tokens_per_char: float = 1.0
    prompt_tokens_per_s: float = 0.0
    max_positions: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for c in self.components for b in c.blocks)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def total_params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def largest_block_bytes(self) -> int:
        return max((b.bytes for b in self.blocks), default=0)

    def component(self, name: str) -> ComponentLayout:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r}; have {[c.name for c in self.components]}")

    def replace_component(self, name: str, **changes) -> "ModelLayout":
        """A copy with one component's hints changed (token_cap, activation_width, ...)."""
        self.component(name)  # raises on a typo
        comps = tuple(dataclasses.replace(c, **changes) if c.name == name else c for c in self.components)
        return dataclasses.replace(self, components=comps)

    def with_submodel(self, name: str, part: "ModelLayout") -> "ModelLayout":
        """This layout plus the blocks of sub-model ``name`` (another checkpoint), planned in the
        same budget. Its blocks are renamed "<name>:<block>"; a component name already taken gets
        the prefix "<name>." so components stay unique."""
        if not name or ":" in name:
            raise ValueError(f"sub-model name {name!r}: give a non-empty name without ':'")
        taken = {c.name for c in self.components}

        def qualify(block: Block) -> Block:
            return dataclasses.replace(block, name=f"{name}:{block.name}", submodel=name,
                                       component=component_name(block.component),
                                       tied_with=tuple(f"{name}:{t}" for t in block.tied_with))

        def component_name(comp: str) -> str:
            return f"{name}.{comp}" if comp in taken else comp

        added = tuple(dataclasses.replace(c, name=component_name(c.name), blocks=tuple(qualify(b) for b in c.blocks))
                      for c in part.components)
        return dataclasses.replace(self, components=self.components + added, notes=self.notes + part.notes)

    @property
    def submodels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.submodel for b in self.blocks))

    def with_hints(self, **changes) -> "ModelLayout":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        lines = [f"{self.model_name} ({str(self.dtype).replace('torch.', '')}): "
                 f"{self.total_params / 1e6:.1f}M params, {gib(self.total_bytes):.2f} GiB"]
        for c in self.components:
            kind = "AR" if c.autoregressive else "non-AR"
            lines.append(f"  {c.name:<16} {kind:<6} {len(c.blocks):>3} blocks {gib(c.bytes):7.3f} GiB"
                         + (" fp32" if c.fp32 else ""))
        return "\n".join(lines)
