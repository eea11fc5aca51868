"""A faster execution of the HiFi-GAN decoder: channels-last convolutions, folded constants, tiling.

Same function as `Decoder.reference` (within ~1e-6); what changed, measured on a 2-core AVX-512 CPU:
- Activations live as [B, C, 1, T] tensors in channels-last memory and every conv runs as conv2d:
  oneDNN then reads/writes them directly instead of reordering to a blocked layout on each call
  (2-3x faster on the 32/64-channel stages).
- The 1/num_kernels average of the parallel resblocks is folded into the next layer's weights
  (leaky_relu(x / n) == leaky_relu(x) / n), and residual adds are done in place.
- Long stages run in fixed-size windows (`tile_samples` output samples plus an exact halo): each
  window stays in cache, no 25 MB tensor is allocated (and page-faulted) per call, and every
  window has the same shape. Short inputs are zero-padded to a few bucketed lengths and masked
  so padding never leaks in. Both matter because oneDNN builds a conv kernel per input shape
  (0.3-1.5 ms each): without them every new sentence length paid ~20 ms of kernel builds.
Weights are copied into non-persistent buffers: the module's state_dict stays the VITS one.

Tried here and not kept: torch.jit.trace + freeze / optimize_for_inference (no gain, ~245 -> 270 ms
for 9 s of audio), torch.compile (inductor, freezing) of a stage (6% faster for a 12 s compile per
shape), oneDNN prepacked convs with a fused residual add (no gain over channels-last conv2d),
glibc malloc thresholds (~5% once tiling existed), bf16 (3.8x slower on this CPU, see FACTS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.piper.decoder import SLOPE, Decoder, ResBlock1

CL = torch.channels_last


def bucket_length(n: int) -> int:
    """Round n up to one of few sizes: multiples of 16, at most 1/16 padding (16 sizes per octave)."""
    step = max(16, 1 << max(n.bit_length() - 5, 0))
    return -(-n // step) * step


class _Conv(nn.Module):
    """One prepared conv: [O, I, 1, K] channels-last weight (scaled) and bias as buffers."""

    def __init__(self, conv: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        weight = (conv.weight.detach() * scale).unsqueeze(2).contiguous(memory_format=CL)
        self.register_buffer("weight", weight, persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        self.padding = (0, conv.padding[0])
        self.dilation = (1, conv.dilation[0])
        self.stride = (1, conv.stride[0])
        self.kernel = conv.kernel_size[0]
        self.transposed = isinstance(conv, nn.ConvTranspose1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding, dilation=self.dilation)


def _masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x.mul_(keep)


class _Stage(nn.Module):
    """[conv_pre ->] leaky_relu -> upsample -> sum of parallel resblocks [-> conv_post -> tanh].

    The resblock sum is left unnormalised: its 1/n is folded into the next stage's weights.
    """

    def __init__(self, up: nn.Module, blocks: list[nn.Module], up_scale: float, post: nn.Module | None = None,
                 post_scale: float = 1.0, pre: nn.Module | None = None, cond: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = _Conv(pre) if pre is not None else None
        self.cond = _Conv(cond) if cond is not None else None
        self.up = _Conv(up, up_scale)
        # each block: residual units; each unit: convs, each preceded by leaky_relu
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.ModuleList([_Conv(c1), _Conv(c2)]) for c1, c2 in zip(b.convs1, b.convs2))
            if isinstance(b, ResBlock1) else nn.ModuleList(nn.ModuleList([_Conv(c)]) for c in b.convs)
            for b in blocks)
        self.post = _Conv(post, post_scale) if post is not None else None
        self.rate, self.kernel, self.pad = up.stride[0], up.kernel_size[0], up.padding[0]
        span = max(sum(c.dilation[1] * (c.kernel - 1) // 2 for unit in b for c in unit) for b in self.blocks)
        span += (post.kernel_size[0] - 1) // 2 if post is not None else 0
        pre_span = (pre.kernel_size[0] - 1) // 2 if pre is not None else 0
        # input samples either side that can reach an output sample of this stage
        self.halo = math.ceil((span + self.kernel) / self.rate) + 1 + pre_span

    def out_length(self, n: int) -> int:
        return (n - 1) * self.rate - 2 * self.pad + self.kernel

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None, valid: int | None = None) -> torch.Tensor:
        """x [B, C, 1, n]; with `valid`, samples from `valid` on are padding, kept at zero throughout."""
        keep_in = keep = None
        if valid is not None and valid < x.shape[-1]:
            steps = torch.arange(self.out_length(x.shape[-1]), device=x.device)
            keep = (steps < self.out_length(valid)).to(x.dtype).view(1, 1, 1, -1)
            keep_in = (torch.arange(x.shape[-1], device=x.device) < valid).to(x.dtype).view(1, 1, 1, -1)
        if self.pre is not None:
            x = self.pre(x)
            if g is not None and self.cond is not None:
                x = x + self.cond(g.unsqueeze(2))
            x = _masked(x, keep_in)
        x = _masked(self.up(F.leaky_relu(x, SLOPE)), keep)
        act = F.leaky_relu(x, SLOPE)  # shared by every block's first conv
        total = None
        for block in self.blocks:
            y = x
            for u, unit in enumerate(block):
                h = act if u == 0 else F.leaky_relu(y, SLOPE)
                for c, conv in enumerate(unit):
                    h = _masked(conv(h if c == 0 else F.leaky_relu(h, SLOPE)), keep)
                h += y
                y = h
            if total is None:
                total = y
            else:
                total += y
        if self.post is not None:
            total = torch.tanh(self.post(F.leaky_relu(total, 0.01)))
        return total

    def run(self, x: torch.Tensor, g: torch.Tensor | None, tile_samples: int) -> torch.Tensor:
        """forward(x) computed in fixed-size overlapping windows, or once on a bucketed length."""
        n = x.shape[-1]
        step = max(tile_samples // self.rate, 1)
        window = step + 2 * self.halo
        if not tile_samples:
            return self(x, g)
        if n <= window:
            padded = min(bucket_length(n), window)
            y = self(F.pad(x, (0, padded - n)), g, valid=n)
            return y[..., :self.out_length(n)]
        pieces = []
        for a in range(0, n, step):
            b = min(a + step, n)
            lo = min(max(a - self.halo, 0), n - window)  # every window has the same length
            y = self(x[..., lo:lo + window], g)
            end = b * self.rate if b < n else self.out_length(n)
            pieces.append(y[..., a * self.rate - lo * self.rate:end - lo * self.rate])
        return torch.cat(pieces, dim=-1)


class FastDecoder(nn.Module):
    """Channels-last, windowed execution of a `Decoder`'s weights; call like the decoder."""

    def __init__(self, dec: Decoder, tile_samples: int = 16384, first_tile_frames: int = 256) -> None:
        super().__init__()
        self.tile_samples = tile_samples
        nk, last = dec.num_kernels, len(dec.ups) - 1
        self.stages = nn.ModuleList(
            _Stage(up, list(dec.resblocks[i * nk:(i + 1) * nk]), 1.0 if i == 0 else 1.0 / nk,
                   post=dec.conv_post if i == last else None, post_scale=1.0 / nk,
                   pre=dec.conv_pre if i == 0 else None, cond=dec.cond if i == 0 else None)
            for i, up in enumerate(dec.ups))
        # the first stage (128+ channels) is cheap per sample: smaller windows keep its shapes few
        self.tiles = [min(tile_samples, first_tile_frames * dec.upsample_rates[0])] + \
            [tile_samples] * (len(dec.ups) - 1)

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T] -> [B, T * hop]."""
        x = z.unsqueeze(2).contiguous(memory_format=CL)
        on_cpu = x.device.type == "cpu"  # windows and buckets are for oneDNN's caches
        for stage, tile in zip(self.stages, self.tiles):
            x = stage.run(x, g, tile if on_cpu and self.tile_samples else 0)
        return x.reshape(x.shape[0], -1)
