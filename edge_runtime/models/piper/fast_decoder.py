"""A faster execution of the HiFi-GAN decoder: channels-last convolutions, folded constants, tiling.

Same function as `Decoder.forward` (within ~1e-6), three changes measured on a 2-core AVX-512 CPU:
- Activations live as [B, C, 1, T] tensors in channels-last memory and every conv runs as conv2d:
  oneDNN then reads/writes them directly instead of reordering to a blocked layout on each call
  (2-3x faster on the 32/64-channel stages).
- The 1/num_kernels average of the parallel resblocks is folded into the next layer's weights
  (leaky_relu(x / n) == leaky_relu(x) / n), and residual adds are done in place.
- The long, thin stages run in tiles of `tile_samples` output samples with an exact halo: each tile
  stays in cache and no 25 MB tensor is allocated (and page-faulted) per call. Tiles overlap by
  the stage's receptive field, so the joined output equals the untiled one.
Weights are copied into non-persistent buffers: the module's state_dict stays the VITS one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import SLOPE, Decoder, ResBlock1

CL = torch.channels_last


def _weight4d(conv: nn.Module, scale: float = 1.0) -> torch.Tensor:
    """[O, I, K] conv weight -> [O, I, 1, K] in channels-last memory (scaled)."""
    return (conv.weight.detach() * scale).unsqueeze(2).contiguous(memory_format=CL)


class _Conv(nn.Module):
    """One prepared conv: weights as buffers, geometry as ints."""

    def __init__(self, conv: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", _weight4d(conv, scale), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        self.padding = (0, conv.padding[0])
        self.dilation = (1, conv.dilation[0])
        self.stride = (1, conv.stride[0])
        self.transposed = isinstance(conv, nn.ConvTranspose1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)


class _Stage(nn.Module):
    """leaky_relu -> upsample -> sum of parallel resblocks (unnormalised: 1/n is folded downstream)."""

    def __init__(self, up: nn.Module, blocks: list[nn.Module], up_scale: float, post: nn.Module | None,
                 post_scale: float) -> None:
        super().__init__()
        self.up = _Conv(up, up_scale)
        # each block is a list of residual units; each unit a list of convs, each preceded by leaky_relu
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.ModuleList([_Conv(c1), _Conv(c2)]) for c1, c2 in zip(b.convs1, b.convs2))
            if isinstance(b, ResBlock1) else nn.ModuleList(nn.ModuleList([_Conv(c)]) for c in b.convs)
            for b in blocks)
        self.post = _Conv(post, post_scale) if post is not None else None
        self.rate = up.stride[0]
        self.kernel = up.kernel_size[0]
        self.pad = up.padding[0]
        span = max(sum(c.dilation[1] * (c.weight.shape[-1] - 1) // 2 for unit in b for c in unit)
                   for b in self.blocks)
        if post is not None:
            span += (post.kernel_size[0] - 1) // 2
        # input samples either side that can reach an output sample of this stage
        self.halo = math.ceil((span + self.kernel) / self.rate) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(F.leaky_relu(x, SLOPE))
        act = F.leaky_relu(x, SLOPE)  # shared by every block's first conv
        total = None
        for block in self.blocks:
            y = x
            for u, unit in enumerate(block):
                h = act if u == 0 else F.leaky_relu(y, SLOPE)
                for c, conv in enumerate(unit):
                    h = conv(h if c == 0 else F.leaky_relu(h, SLOPE))
                h += y
                y = h
            if total is None:
                total = y
            else:
                total += y
        if self.post is not None:
            total = torch.tanh(self.post(F.leaky_relu(total, 0.01)))
        return total

    def out_length(self, n: int) -> int:
        return (n - 1) * self.rate - 2 * self.pad + self.kernel

    def tiled(self, x: torch.Tensor, tile_samples: int) -> torch.Tensor:
        """Same as forward, computed on overlapping input tiles of ~tile_samples output samples."""
        n = x.shape[-1]
        step = max(tile_samples // self.rate, 1)
        if n <= step + self.halo:
            return self(x)
        total = self.out_length(n)
        pieces = []
        for a in range(0, n, step):
            b = min(a + step, n)
            lo, hi = max(a - self.halo, 0), min(b + self.halo, n)
            y = self(x[..., lo:hi])
            start, end = a * self.rate, (b * self.rate if b < n else total)
            pieces.append(y[..., start - lo * self.rate:end - lo * self.rate])
        return torch.cat(pieces, dim=-1)


class FastDecoder(nn.Module):
    """Channels-last, tiled execution of a `Decoder`'s weights; call like the decoder."""

    def __init__(self, dec: Decoder, tile_samples: int = 16384) -> None:
        super().__init__()
        self.tile_samples = tile_samples
        nk = dec.num_kernels
        self.conv_pre = _Conv(dec.conv_pre)
        self.cond = _Conv(dec.cond) if dec.cond is not None else None
        last = len(dec.ups) - 1
        self.stages = nn.ModuleList(
            _Stage(up, list(dec.resblocks[i * nk:(i + 1) * nk]), 1.0 if i == 0 else 1.0 / nk,
                   dec.conv_post if i == last else None, 1.0 / nk)
            for i, up in enumerate(dec.ups))

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T] -> [B, T * hop]."""
        x = self.conv_pre(z.unsqueeze(2).contiguous(memory_format=CL))
        if g is not None and self.cond is not None:
            x = x + self.cond(g.unsqueeze(2))
        for stage in self.stages:
            x = stage.tiled(x, self.tile_samples) if self.tile_samples else stage(x)
        return x.reshape(x.shape[0], -1)
