"""VITS stochastic duration predictor, inference (reverse) direction only.

Noise [B, 2, T] (already scaled by noise_w) runs backwards through the flows, conditioned on the
encoder output, and its first channel is log-duration. Only the flows used in reverse exist:
ElementwiseAffine at position 0 and the ConvFlows at 3, 5, 7, ...; position 1 is a training-only
flow that inference skips (it is absent from Piper's ONNX files too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.piper.text_encoder import LayerNorm, masked


class DDSConv(nn.Module):
    """Dilated depth-separable conv stack with layer norms and GELUs, residual per layer."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int, dilations: list[int] | None = None) -> None:
        super().__init__()
        dilations = dilations or [kernel_size ** i for i in range(n_layers)]
        self.convs_sep = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=d,
                      padding=(kernel_size * d - d) // 2) for d in dilations)
        self.convs_1x1 = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in dilations)
        self.norms_1 = nn.ModuleList(LayerNorm(channels) for _ in dilations)
        self.norms_2 = nn.ModuleList(LayerNorm(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        if g is not None:
            x = x + g
        for sep, c1x1, n1, n2 in zip(self.convs_sep, self.convs_1x1, self.norms_1, self.norms_2):
            y = F.gelu(n1(sep(masked(x, mask))))
            x = x + F.gelu(n2(c1x1(y)))
        return masked(x, mask)


def rq_spline_inverse(y: torch.Tensor, uw: torch.Tensor, uh: torch.Tensor, ud: torch.Tensor,
                      tail_bound: float, min_width: float = 1e-3, min_height: float = 1e-3,
                      min_derivative: float = 1e-3) -> torch.Tensor:
    """Inverse of a monotonic rational-quadratic spline on [-B, B], identity outside (linear tails).

    y: [...]; uw, uh: [..., K] unnormalised bin widths/heights; ud: [..., K-1] inner derivatives.
    """
    bins = uw.shape[-1]
    edge = math.log(math.exp(1 - min_derivative) - 1)  # softplus(edge) + min = 1: slope 1 at the tails
    derivs = min_derivative + F.softplus(F.pad(ud, (1, 1), value=edge))

    def knots(unnorm: torch.Tensor, minimum: float) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = minimum + (1 - minimum * bins) * torch.softmax(unnorm, dim=-1)
        cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) * (2 * tail_bound) - tail_bound
        cum = torch.cat([torch.full_like(cum[..., :1], -tail_bound), cum[..., 1:-1],
                         torch.full_like(cum[..., :1], tail_bound)], dim=-1)
        return cum, cum[..., 1:] - cum[..., :-1]

    cumw, widths = knots(uw, min_width)
    cumh, heights = knots(uh, min_height)
    # which bin each y falls in (searchsorted with a nudge on the last knot)
    locations = torch.cat([cumh[..., :-1], cumh[..., -1:] + 1e-6], dim=-1)
    idx = ((y.unsqueeze(-1) >= locations).sum(dim=-1, keepdim=True) - 1).clamp_(0, bins - 1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, idx).squeeze(-1)

    x_k, w_k, y_k, h_k = pick(cumw), pick(widths), pick(cumh), pick(heights)
    delta = pick(heights / widths)
    d_k, d_k1 = pick(derivs), pick(derivs[..., 1:])
    # solve the quadratic a*theta^2 + b*theta + c = 0 for theta in [0, 1] (stable root form)
    dy = y - y_k
    slope_sum = d_k + d_k1 - 2 * delta
    a = dy * slope_sum + h_k * (delta - d_k)
    b = h_k * d_k - dy * slope_sum
    c = -delta * dy
    theta = (2 * c) / (-b - torch.sqrt(b * b - 4 * a * c))
    x = theta * w_k + x_k
    inside = (y >= -tail_bound) & (y <= tail_bound)
    return torch.where(inside, x, y)


class ConvFlow(nn.Module):
    """Coupling flow whose second half passes through a spline parameterised by the first."""

    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, n_layers: int,
                 num_bins: int = 10, tail_bound: float = 5.0, dilations: list[int] | None = None) -> None:
        super().__init__()
        self.half = in_channels // 2
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.scale = math.sqrt(filter_channels)
        self.pre = nn.Conv1d(self.half, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel_size, n_layers, dilations)
        self.proj = nn.Conv1d(filter_channels, self.half * (num_bins * 3 - 1), 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        x0, x1 = x.split(self.half, dim=1)
        h = self.convs(self.pre(x0), mask, g)
        h = masked(self.proj(h), mask)
        b, c, t = x0.shape
        h = h.reshape(b, c, -1, t).permute(0, 1, 3, 2)  # [b, c, t, 3K-1]
        nb = self.num_bins
        x1 = rq_spline_inverse(x1, h[..., :nb] / self.scale, h[..., nb:2 * nb] / self.scale,
                               h[..., 2 * nb:], self.tail_bound)
        return masked(torch.cat([x0, x1], dim=1), mask)


class ElementwiseAffine(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        return masked((x - self.m) * torch.exp(-self.logs), mask)


class Flip(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, g: torch.Tensor | None = None):
        return torch.flip(x, [1])


class Unused(nn.Module):
    """Stands where training-only flows sit, so weight indices line up with VITS names."""


class DurationPredictor(nn.Module):
    def __init__(self, in_channels: int, filter_channels: int, kernel_size: int, n_layers: int,
                 n_flows: int, flow_n_layers: int, num_bins: int, tail_bound: float,
                 dilations: list[int] | None = None, flow_dilations: list[int] | None = None,
                 gin_channels: int = 0) -> None:
        super().__init__()
        self.pre = nn.Conv1d(in_channels, filter_channels, 1)
        self.convs = DDSConv(filter_channels, kernel_size, n_layers, dilations)
        self.proj = nn.Conv1d(filter_channels, filter_channels, 1)
        self.cond = nn.Conv1d(gin_channels, filter_channels, 1) if gin_channels else None
        flows: list[nn.Module] = [ElementwiseAffine(2)]
        for i in range(n_flows):
            flows.append(Unused() if i == 0 else ConvFlow(2, filter_channels, kernel_size, flow_n_layers,
                                                          num_bins, tail_bound, flow_dilations))
            flows.append(Flip())
        self.flows = nn.ModuleList(flows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, noise: torch.Tensor,
                g: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder hidden [B, H, T] and scaled noise [B, 2, T] -> log durations [B, 1, T]."""
        x = self.pre(x)
        if g is not None and self.cond is not None:
            x = x + self.cond(g)
        x = masked(self.proj(self.convs(x, mask)), mask)
        z = noise
        # Inference runs the flows in reverse; each flow's forward IS its reverse pass, and it is
        # called as a module so offload hooks (accelerate, DeepSpeed) see its weights being used.
        for flow in reversed(self.flows):
            if not isinstance(flow, Unused):
                z = flow(z, mask, x)
        return z[:, :1]
