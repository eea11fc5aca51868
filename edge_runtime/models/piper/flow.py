"""VITS normalising flow (reverse direction): residual coupling layers with WaveNet, and flips."""

from __future__ import annotations

import torch
from torch import nn

from edge_runtime.models.piper.duration import Flip
from edge_runtime.models.piper.text_encoder import masked


class WaveNet(nn.Module):
    """Non-causal WaveNet: gated dilated convs with residual and skip 1x1s, optional speaker conditioning."""

    def __init__(self, hidden: int, kernel_size: int, dilations: list[int], gin_channels: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        self.n_layers = len(dilations)
        self.in_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations)
        self.res_skip_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden if i < self.n_layers - 1 else hidden, 1) for i in range(self.n_layers))
        self.cond_layer = nn.Conv1d(gin_channels, 2 * hidden * self.n_layers, 1) if gin_channels else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden
        if g is not None and self.cond_layer is not None:
            g = self.cond_layer(g)
        else:
            g = None
        out = None
        for i, (conv_in, conv_rs) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = conv_in(x)
            if g is not None:
                a = a + g[:, 2 * h * i:2 * h * (i + 1)]
            acts = torch.tanh(a[:, :h]) * torch.sigmoid(a[:, h:])
            rs = conv_rs(acts)
            if i < self.n_layers - 1:
                x = masked(x + rs[:, :h], mask)
                skip = rs[:, h:]
            else:
                skip = rs
            out = skip if out is None else out + skip
        return masked(out, mask)


class CouplingLayer(nn.Module):
    """Affine coupling: the second half is shifted (and scaled unless mean-only) by a WaveNet of the first."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilations: list[int],
                 gin_channels: int = 0, mean_only: bool = True) -> None:
        super().__init__()
        self.half = channels // 2
        self.mean_only = mean_only
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WaveNet(hidden, kernel_size, dilations, gin_channels)
        self.post = nn.Conv1d(hidden, self.half * (1 if mean_only else 2), 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = x.split(self.half, dim=1)
        h = self.enc(masked(self.pre(x0), mask), mask, g)
        stats = masked(self.post(h), mask)
        if self.mean_only:
            x1 = masked(x1 - stats, mask)
        else:
            m, logs = stats.split(self.half, dim=1)
            x1 = masked((x1 - m) * torch.exp(-logs), mask)
        return torch.cat([x0, x1], dim=1)


class Flow(nn.Module):
    """[coupling, flip] * n_flows, run backwards: latent from the prior -> decoder input."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilations: list[int], n_flows: int,
                 gin_channels: int = 0, mean_only: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_flows):
            layers.append(CouplingLayer(channels, hidden, kernel_size, dilations, gin_channels, mean_only))
            layers.append(Flip())
        self.flows = nn.ModuleList(layers)
        self.mean_only = mean_only
        self.fast: nn.Module | None = None  # a FastFlow once PiperVits.prepare_for_inference ran

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(z, mask, g)
        return self.reference(z, mask, g)

    def reference(self, z: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        """The plain eager computation (the numerical reference for the fast path)."""
        for layer in reversed(self.flows):
            z = layer(z, mask, g)  # as a module: offload hooks see it (its forward is the reverse pass)
        return z
