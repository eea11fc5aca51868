"""The flow's velocity estimator (upstream ``CausalConditionalDecoder``): a Matcha-style one-level 1-D
UNet over mel frames, conditioned on the flow time.

    [noisy mel, encoder mel, speaker, prompt mel] (4 x 80 channels)
    -> down: resnet 320->256 + 4 transformer blocks (kept as the skip) -> causal conv3
    -> 12 x (resnet 256->256 + 4 transformer blocks)
    -> up: [h, skip] resnet 512->256 + 4 transformer blocks -> causal conv3
    -> causal block -> 1x1 conv -> velocity (80 channels)

Tensors are channels last ([B, T, C]) throughout, so convs are matrix products over frame windows
and nothing is transposed between layers. Every conv is causal and attention is either full
(offline) or chunk-causal (streaming), so with a :class:`LayerState` per flow time the estimator can
run on new frames only. Resnet blocks add a projection of the time embedding;
:meth:`CausalUNetEstimator.time_biases` computes those for all Euler steps at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.cosyvoice.flow.config import FlowConfig
from edge_runtime.models.cosyvoice.flow.incremental import CausalConv1d, LayerState, WindowedConv1d


def timestep_sinusoids(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Flow times t [S] -> [S, dim]: sin | cos of 1000 t at geometric frequencies (Matcha's embedding)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = (1000 * t[:, None]) * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(t.dtype)


class TimestepMLP(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalBlock(nn.Module):
    """Causal conv3 -> LayerNorm over channels -> Mish."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        # upstream's Sequential(conv, transpose, norm, transpose, mish): the norm's keys are block.2.*
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out)])

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        return F.mish(self.block[2](self.block[0](x, state)))


class CausalResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock(dim, dim_out)
        self.block2 = CausalBlock(dim_out, dim_out)
        self.res_conv = WindowedConv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, time_bias: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        """x [B, T, dim]; time_bias [1, dim_out], this block's projection of the flow time."""
        h = self.block1(x, state) + time_bias[:, None, :]
        return self.block2(h, state) + self.res_conv(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # upstream: [Linear, Dropout]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: LayerState | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.to_q(x).view(b, t, h, d)
        k = self.to_k(x).view(b, t, h, d)
        v = self.to_v(x).view(b, t, h, d)
        if state is not None:
            k, v = state.keys_values(self, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, h * d))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # upstream's [GELU(proj), Dropout, Linear]: the output layer's keys are net.2.*
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward on [B, T, C] (diffusers' BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: LayerState | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask, state)
        return x + self.ff(self.norm3(x))


class CausalUNetEstimator(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        c, time_dim = cfg.estimator_channels, cfg.time_embed_dim
        self.sinusoid_dim = cfg.estimator_in_channels

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(c, cfg.estimator_heads, cfg.estimator_head_dim)
                                 for _ in range(cfg.estimator_blocks))

        self.time_mlp = TimestepMLP(cfg.estimator_in_channels, time_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock(cfg.estimator_in_channels, c, time_dim), transformers(), CausalConv1d(c, c, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock(c, c, time_dim), transformers()])
                                        for _ in range(cfg.estimator_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock(2 * c, c, time_dim), transformers(), CausalConv1d(c, c, 3)])])
        self.final_block = CausalBlock(c, c)
        self.final_proj = WindowedConv1d(c, cfg.mel_bins, 1)

    def placement_units(self) -> list[nn.Module]:
        """The modules, in call order, an offloading backend may place one by one: each is only ever
        run through its own forward (a resnet block's time MLP runs apart from the block, in
        :meth:`time_biases`, so it is a unit of its own)."""
        units: list[nn.Module] = [self.time_mlp]
        for group in (*self.down_blocks, *self.mid_blocks, *self.up_blocks):
            for part in group:
                if isinstance(part, CausalResnetBlock):
                    units += [part.mlp, part.block1, part.block2, part.res_conv]
                elif isinstance(part, nn.ModuleList):
                    units += list(part)
                else:
                    units.append(part)
        return [*units, self.final_block, self.final_proj]

    def _resnets(self) -> list[CausalResnetBlock]:
        return [self.down_blocks[0][0], *(mid[0] for mid in self.mid_blocks), self.up_blocks[0][0]]

    def time_biases(self, t: torch.Tensor) -> list[list[torch.Tensor]]:
        """Flow times t [S] -> per step, per resnet block (in call order), its time bias [1, C]."""
        emb = self.time_mlp(timestep_sinusoids(t, self.sinusoid_dim))
        per_block = [block.mlp(emb) for block in self._resnets()]  # each [S, C]
        return [[bias[s:s + 1] for bias in per_block] for s in range(t.shape[0])]

    def forward(self, x: torch.Tensor, time_biases: Sequence[torch.Tensor], mask: torch.Tensor | None,
                state: LayerState | None = None) -> torch.Tensor:
        """x [B, T, 320] (channels last) -> velocity [B, T, 80]; time_biases: one step's entry of
        :meth:`time_biases`; mask [T, keys] (True = attend) or None; state: what earlier frames left
        at this flow time."""
        bias = iter(time_biases)
        resnet, blocks, conv = self.down_blocks[0]
        h = _transform(blocks, resnet(x, next(bias), state), mask, state)
        skip = h
        h = conv(h, state)
        for resnet, blocks in self.mid_blocks:
            h = _transform(blocks, resnet(h, next(bias), state), mask, state)
        resnet, blocks, conv = self.up_blocks[0]
        h = _transform(blocks, resnet(torch.cat([h, skip], dim=2), next(bias), state), mask, state)
        h = self.final_block(conv(h, state), state)
        return self.final_proj(h)


def _transform(blocks: nn.ModuleList, h: torch.Tensor, mask: torch.Tensor | None,
               state: LayerState | None) -> torch.Tensor:
    for block in blocks:
        h = block(h, mask, state)
    return h
