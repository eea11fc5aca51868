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
from typing import Any

from edge_runtime.policy.planner._profile import gpu_vram_gib, setting
from edge_runtime.policy.planner.layout import GIB, Block, ComponentLayout, ModelLayout, gib

DEFAULT_TEXT_CHARS = 1000
DEFAULT_RESERVE_GIB = 0.8
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


def request_tokens(profile: Any, layout: ModelLayout) -> int:
    """Worst-case sequence in model tokens: one sentence (the engine synthesises sentence by
    sentence, none longer than MAX_SENTENCE_CHARS, nor than limits.max_text_chars) plus
    max_prompt_seconds of voice prompt, through the layout's per-model rates, capped at the
    model's positions."""
    chars = min(float(setting(profile, "limits.max_text_chars", DEFAULT_TEXT_CHARS)), MAX_SENTENCE_CHARS)
    prompt_s = float(setting(profile, "limits.max_prompt_seconds", 0))
    tokens = math.ceil(chars * layout.tokens_per_char + prompt_s * layout.prompt_tokens_per_s)
    if layout.max_positions:
        tokens = min(tokens, layout.max_positions)
    return max(1, tokens)


def profile_batch(profile: Any) -> int:
    """``batching.max_batch``; ``auto`` budgets for one request (the scheduler grows the batch
    only when measured headroom allows)."""
    value = setting(profile, "batching.max_batch", 1)
    return 1 if value == "auto" else max(1, int(value))


def block_kv_bytes(block: Block, component: ComponentLayout, tokens: int, batch: int) -> int:
    per_seq = (block.kv_elems_per_token * component.tokens(tokens)
               + block.cross_kv_elems_per_token * component.cross_tokens(tokens))
    return per_seq * batch * block.compute_bytes


def component_activation_bytes(component: ComponentLayout, tokens: int, batch: int) -> int:
    if not component.blocks:
        return 0
    elem = max(b.compute_bytes for b in component.blocks)
    return component.activation_width * component.tokens(tokens) * batch * elem


def compute_budget(profile: Any, layout: ModelLayout, max_batch: int | None = None,
                   max_tokens: int | None = None) -> Budget:
    """Budget for ``max_batch`` requests of ``max_tokens`` tokens (defaults: from the profile)."""
    batch = profile_batch(profile) if max_batch is None else max(1, int(max_batch))
    tokens = request_tokens(profile, layout) if max_tokens is None else max(1, int(max_tokens))
    vram_gib = gpu_vram_gib(profile)
    reserve_gib = float(setting(profile, "memory.reserve_gib", DEFAULT_RESERVE_GIB)) if vram_gib else 0.0
    kv = {b.name: block_kv_bytes(b, c, tokens, batch)
          for c in layout.components if c.autoregressive for b in c.blocks}
    activations = max((component_activation_bytes(c, tokens, batch) for c in layout.components), default=0)
    return Budget(vram_bytes=int(vram_gib * GIB), reserve_bytes=int(reserve_gib * GIB),
                  activation_bytes=activations, kv_cache_bytes=sum(kv.values()),
                  batch=batch, tokens=tokens, kv_by_block={k: v for k, v in kv.items() if v})
