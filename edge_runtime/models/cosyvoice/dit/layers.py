"""The DiT estimator's layers (upstream ``cosyvoice/flow/DiT/modules.py`` and x-transformers' rotary).

Tensors are channels last ([B, T, C]). Every layer that mixes frames is causal (the conv position
embedding) or attention under a mask, so with a :class:`LayerState` per flow time they run on new
frames only. The flow time enters through AdaLN modulations, which depend on the time alone:
:class:`Modulation` layers run once per Euler step in the solver's plan, not once per chunk.
Parameter names equal upstream's, so ``flow.pt`` loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.cosyvoice.flow.estimator import timestep_sinusoids
from edge_runtime.models.cosyvoice.flow.incremental import LayerState

NORM_EPS = 1e-6  # upstream's LayerNorms (no affine parameters) in AdaLN and before the feed-forward


class RotaryEmbedding(nn.Module):
    """x-transformers' ``RotaryEmbedding(dim_head)``: angles position x inv_freq, rotating adjacent
    channel pairs. ``inv_freq`` is a buffer in ``flow.pt``, hence a registered (persistent) buffer."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self._frequencies(None))

    def _frequencies(self, device: torch.device | None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def forward(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, dim / 2] (fp32) of positions ``start..end``."""
        inv = self.inv_freq
        if inv.dtype != torch.float32:
            # half-precision frequencies are off by up to 0.4%, i.e. radians at frame 1000: use fp32
            # ones (the buffer holds exactly this formula's values)
            inv = self._frequencies(inv.device)
        # positions in fp32 too: half precision cannot count frames past 256 (bf16) / 2048 (fp16)
        angle = torch.arange(start, end, device=inv.device, dtype=torch.float32)[:, None] * inv[None, :]
        return angle.cos(), angle.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``2 * cos.shape[-1]`` channels of ``x`` [B, T, C] (pairs
    (2i, 2i+1) turned by angle i), the rest unchanged. Upstream rotates the whole projection
    [B, T, heads x dim_head] with tables of width dim_head, so only the FIRST HEAD gets positions;
    the math is kept as is (the weights were trained so). Computed in fp32, as x-transformers does."""
    width = 2 * cos.shape[-1]
    even, odd = x[..., :width].float().unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([turned.to(x.dtype), x[..., width:]], dim=-1)


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs (kernel 31, 16 groups), each left-padded (causal) and followed by Mish.
    Upstream wraps each conv in Sequential(conv, Mish): its keys are conv1.0.* / conv2.0.*."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.context = kernel - 1
        self.conv1 = nn.ModuleList([nn.Conv1d(dim, dim, kernel, groups=groups)])
        self.conv2 = nn.ModuleList([nn.Conv1d(dim, dim, kernel, groups=groups)])

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        h = x
        for conv in (self.conv1[0], self.conv2[0]):
            padded = F.pad(h, (0, 0, self.context, 0)) if state is None else state.padded(conv, h, self.context)
            # through the module's own call: an offloading backend brings its weights in on that call
            h = F.mish(conv(padded.transpose(1, 2)).transpose(1, 2))
        return h


class InputEmbedding(nn.Module):
    """[noisy mel, prompt mel, mu, speaker] -> Linear -> + causal conv position embedding."""

    def __init__(self, in_channels: int, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim, kernel, groups)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        h = self.proj(x)
        return self.conv_pos_embed(h, state) + h


class TimestepEmbedding(nn.Module):
    """Flow times t [S] -> [S, dim]: sinusoids of 1000 t (256 wide) -> Linear -> SiLU -> Linear.
    The sinusoids are computed from fp32 times (angles up to 1000 rad) and only then cast to the
    weights' dtype."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        sinusoids = timestep_sinusoids(t.float(), self.freq_dim)
        return self.time_mlp(sinusoids.to(self.time_mlp[0].weight.dtype))


class Modulation(nn.Module):
    """AdaLN(-zero)'s projection of the time embedding: SiLU -> Linear(dim, parts x dim). Upstream's
    AdaLayerNormZero also normalises x; here the (parameter-free) norm runs in the block, and this
    runs once per Euler step (its output depends on the flow time only)."""

    def __init__(self, dim: int, parts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, parts * dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(time))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) of x [B, T, C], scaled by 1 + scale and shifted ([1, 1, C] each)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # upstream: [Linear, Dropout]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                state: LayerState | None) -> torch.Tensor:
        """x [B, T, dim] at the positions cos/sin describe; mask [T, keys] (True = attend) or None;
        ``state``: the keys/values (already rotated) of the earlier frames at this flow time."""
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = rotate(self.to_q(x), cos, sin).view(b, t, h, d)
        k = rotate(self.to_k(x), cos, sin).view(b, t, h, d)
        v = self.to_v(x).view(b, t, h, d)
        if state is not None:
            k, v = state.keys_values(self, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, h * d))


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear; upstream's nesting gives keys ff.0.0.* / ff.2.*."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.ff = nn.ModuleList([nn.ModuleList([nn.Linear(dim, inner)]), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff[2](F.gelu(self.ff[0][0](x), approximate="tanh"))


class DiTBlock(nn.Module):
    """AdaLN-zero: x + gate_a * attn(mod(x)), then x + gate_f * ff(mod(x)), the six modulation vectors
    (shift, scale, gate for attention, then for the feed-forward) from ``attn_norm``."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_inner: int) -> None:
        super().__init__()
        self.attn_norm = Modulation(dim, 6)
        self.attn = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim, ff_inner)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, state: LayerState | None) -> torch.Tensor:
        """modulation [1, 6 x dim]: this block's ``attn_norm`` output for the current flow time."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = modulation[:, None, :].chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(x, shift_a, scale_a), cos, sin, mask, state)
        return x + gate_f * self.ff(modulate(x, shift_f, scale_f))
