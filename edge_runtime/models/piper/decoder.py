"""HiFi-GAN generator (VITS decoder): latent frames [B, C, T] -> waveform [B, T * hop].

Weight norm is already folded into plain weights. The parallel resblocks of one stage all start
with leaky_relu of the same input, so it is computed once per stage and shared (ONNX does the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.1  # HiFi-GAN's leaky ReLU slope everywhere except before conv_post (0.01)


def _same(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """HiFi-GAN type 1: per dilation, lrelu -> dilated conv -> lrelu -> conv, then residual add."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=_same(kernel))
                                    for _ in dilations)

    def forward(self, x: torch.Tensor, first_act: torch.Tensor | None = None) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            xt = first_act if i == 0 and first_act is not None else F.leaky_relu(x, SLOPE)
            x = c2(F.leaky_relu(c1(xt), SLOPE)) + x
        return x


class ResBlock2(nn.Module):
    """HiFi-GAN type 2 (Piper's medium/low voices): per dilation, lrelu -> dilated conv, residual add."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same(kernel, d))
                                   for d in dilations)

    def forward(self, x: torch.Tensor, first_act: torch.Tensor | None = None) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            xt = first_act if i == 0 and first_act is not None else F.leaky_relu(x, SLOPE)
            x = conv(xt) + x
        return x


class Decoder(nn.Module):
    def __init__(self, in_channels: int, upsample_initial_channel: int, upsample_rates: list[int],
                 upsample_kernel_sizes: list[int], upsample_paddings: list[int], resblock: str,
                 resblock_kernel_sizes: list[int], resblock_dilation_sizes: list[list[int]],
                 pre_kernel_size: int = 7, post_kernel_size: int = 7, post_bias: bool = False,
                 gin_channels: int = 0) -> None:
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.upsample_rates = list(upsample_rates)
        ch = upsample_initial_channel
        self.conv_pre = nn.Conv1d(in_channels, ch, pre_kernel_size, padding=_same(pre_kernel_size))
        self.cond = nn.Conv1d(gin_channels, ch, 1) if gin_channels else None
        block = ResBlock1 if resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel, pad in zip(upsample_rates, upsample_kernel_sizes, upsample_paddings):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, rate, padding=pad))
            ch //= 2
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, d))
        self.conv_post = nn.Conv1d(ch, 1, post_kernel_size, padding=_same(post_kernel_size), bias=post_bias)
        self.fast: nn.Module | None = None  # a FastDecoder once PiperVits.prepare_for_inference ran

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T] -> [B, T * hop]."""
        if self.fast is not None:
            return self.fast(z, g)
        return self.reference(z, g)

    def reference(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """The plain eager computation (the numerical reference for the fast path)."""
        x = self.conv_pre(z)
        if g is not None and self.cond is not None:
            x = x + self.cond(g)
        nk = self.num_kernels
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, SLOPE))
            act = F.leaky_relu(x, SLOPE)  # shared first activation of this stage's resblocks
            xs = self.resblocks[i * nk](x, act)
            for j in range(1, nk):
                xs = xs + self.resblocks[i * nk + j](x, act)
            x = xs / nk
        x = self.conv_post(F.leaky_relu(x, 0.01))
        return torch.tanh(x).squeeze(1)

    def receptive_field(self) -> int:
        """Input frames either side that can change an output sample (a safe upper bound)."""
        frames, scale = float(self.conv_pre.padding[0]), 1
        nk = self.num_kernels
        for i, up in enumerate(self.ups):
            scale *= self.upsample_rates[i]
            span = max(sum(c.dilation[0] * (c.kernel_size[0] - 1) // 2 for c in rb.modules()
                           if isinstance(c, nn.Conv1d)) for rb in self.resblocks[i * nk:(i + 1) * nk])
            frames += (up.kernel_size[0] + span) / scale
        frames += self.conv_post.padding[0] / scale
        return math.ceil(frames) + 1
