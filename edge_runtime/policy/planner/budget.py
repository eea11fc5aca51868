"""How much of the card is left for weights once the request's working memory is set aside.

    weights budget = tier VRAM - reserve - activations - KV cache

* reserve: CUDA context + allocator slack (profile ``memory.reserve_gib``; 0.4-1 GiB in the field).
* KV cache, per autoregressive attention layer: (K width + V width) x tokens x batch x bytes,
  i.e. 2 * kv_heads * head_dim * tokens * batch * bytes. Cross-attention caches use the encoder
  length. Non-AR components keep no cache.
* activations: a heuristic, the largest over components of
  activation_width x tokens x batch x bytes, where activation_width is ~4x the widest projection
  of a transformer layer (see sizing.ACTIVATION_FACTOR) or a codec's channels x samples per frame.
  It assumes SDPA's flash / memory-efficient kernels (no tokens x tokens score matrix).
All figures are estimates for planning; the memory governor measures the real peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime.policy.planner.layout import GIB, Block, ComponentLayout, ModelLayout, gib

if TYPE_CHECKING:  # the typed profile: policy/schema.py checks every value
    from edge_runtime.policy.schema import Profile

# The longest unit the engine synthesises at once (the text splitter cuts sentences at this length):
# the planner budgets one such sentence, not the whole request text.
MAX_SENTENCE_CHARS = 300


@dataclass(frozen=True)
class Budget:
    vram_bytes: int  # the tier's VRAM; 0 for a CPU-only profile
    reserve_bytes: int
    activation_bytes: int
    kv_cache_bytes: int  # every AR layer's cache on the GPU (the plan counts only GPU-computed ones)
    batch: int
    tokens: int  # request length in the model's tokens (audio frames + text), see request_tokens()
    kv_by_block: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def cpu_only(self) -> bool:
        return self.vram_bytes <= 0

    @property
    def usable_bytes(self) -> int:
        """VRAM the plan may fill: everything but the reserve."""
        return max(0, self.vram_bytes - self.reserve_bytes)

    @property
    def weights_bytes(self) -> int:
        """Room left for weights if every KV cache sits on the GPU (negative: does not fit)."""
        return self.vram_bytes - self.reserve_bytes - self.activation_bytes - self.kv_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"vram_gib": round(gib(self.vram_bytes), 3), "reserve_gib": round(gib(self.reserve_bytes), 3),
                "activation_gib": round(gib(self.activation_bytes), 3),
                "kv_cache_gib": round(gib(self.kv_cache_bytes), 3),
                "weights_gib": round(gib(self.weights_bytes), 3),
                "batch": self.batch, "tokens": self.tokens, "cpu_only": self.cpu_only}

    def __str__(self) -> str:
        if self.cpu_only:
            return (f"CPU-only budget: batch {self.batch} x {self.tokens} tokens, activations "
                    f"{gib(self.activation_bytes):.2f} GiB + KV cache {gib(self.kv_cache_bytes):.2f} GiB in RAM")
        return (f"VRAM {gib(self.vram_bytes):.2f} GiB - reserve {gib(self.reserve_bytes):.2f}"
                f" - activations {gib(self.activation_bytes):.2f} - KV cache {gib(self.kv_cache_bytes):.2f}"
                f" = {gib(self.weights_bytes):.2f} GiB for weights (batch {self.batch} x {self.tokens} tokens)")


def batch_bound(budget: Budget, fixed_bytes: int, kv_gpu_bytes: int) -> int | None:
    """The largest batch a placement holds: ``fixed_bytes`` (resident weights + streaming buffers)
    and the reserve stay, while activations and the GPU KV cache, budgeted here for
    ``budget.batch`` requests, grow linearly with the batch. None for a CPU-only budget."""
    per_batch = budget.activation_bytes + kv_gpu_bytes
    if budget.cpu_only or per_batch <= 0:
        return None
    # integer arithmetic: floor(room / (per_batch / batch)) without rounding a plan that just fits
    return max(0, (budget.usable_bytes - fixed_bytes) * budget.batch // per_batch)


def sentence_chars(profile: Profile) -> int:
    """The longest unit the engine synthesises at once under this profile."""
    return min(profile.limits.max_text_chars, MAX_SENTENCE_CHARS)


def request_tokens(profile: Profile, layout: ModelLayout) -> int:
    """Worst-case sequence in model tokens: one sentence (the engine synthesises sentence by
    sentence, none longer than MAX_SENTENCE_CHARS, nor than limits.max_text_chars) plus
    max_prompt_seconds of voice prompt, through the layout's per-model rates, capped at the
    model's positions."""
    chars = sentence_chars(profile)
    prompt_s = profile.limits.max_prompt_seconds
    tokens = math.ceil(chars * layout.tokens_per_char + prompt_s * layout.prompt_tokens_per_s)
    if layout.max_positions:
        tokens = min(tokens, layout.max_positions)
    return max(1, tokens)


def profile_batch(profile: Profile) -> int:
    """``batching.max_batch``; ``auto`` budgets for one request (the plan's ``max_batch`` then
    bounds how far the serving batch tuner may grow it)."""
    value = profile.batching.max_batch
    return 1 if value == "auto" else value


def block_kv_bytes(block: Block, component: ComponentLayout, tokens: int, batch: int) -> int:
    per_seq = (block.kv_elems_per_token * component.tokens(tokens)
               + block.cross_kv_elems_per_token * component.cross_tokens(tokens))
    return per_seq * batch * block.compute_bytes


def component_activation_bytes(component: ComponentLayout, tokens: int, batch: int,
                               chars: int | None = None) -> int:
    if not component.blocks:
        return 0
    elem = max(b.compute_bytes for b in component.blocks)
    rows = batch if component.batch_cap is None else min(batch, component.batch_cap)
    return component.activation_width * component.tokens(tokens, chars) * rows * elem


def compute_budget(profile: Profile, layout: ModelLayout, max_batch: int | None = None,
                   max_tokens: int | None = None) -> Budget:
    """Budget for ``max_batch`` requests of ``max_tokens`` tokens (defaults: from the profile)."""
    batch = profile_batch(profile) if max_batch is None else max(1, int(max_batch))
    tokens = request_tokens(profile, layout) if max_tokens is None else max(1, int(max_tokens))
    chars = sentence_chars(profile) if max_tokens is None else None
    vram_gib = profile.memory.vram_gib or 0.0  # null (the cpu tier) or 0: CPU-only
    reserve_gib = profile.memory.reserve_gib if vram_gib else 0.0
    kv = {b.name: block_kv_bytes(b, c, tokens, batch)
          for c in layout.components if c.autoregressive for b in c.blocks}
    activations = max((component_activation_bytes(c, tokens, batch, chars) for c in layout.components), default=0)
    return Budget(vram_bytes=int(vram_gib * GIB), reserve_bytes=int(reserve_gib * GIB),
                  activation_bytes=activations, kv_cache_bytes=sum(kv.values()),
                  batch=batch, tokens=tokens, kv_by_block={k: v for k, v in kv.items() if v})
