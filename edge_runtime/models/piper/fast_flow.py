"""A faster execution of the VITS flow (reverse): channels-last conv2d and folded 1x1 convs.

Same function as `Flow.forward` (within float rounding); what changed, and why:
- Activations live as [B, C, 1, T] channels-last tensors and every conv runs as conv2d, as in
  FastDecoder: oneDNN's conv1d path reorders to a blocked layout on every call, this does not.
- The skip outputs of each WaveNet only ever feed `post` (a 1x1 conv, linear): post's weight is
  folded into every res/skip conv, so skips are `half` channels wide instead of `hidden` and the
  separate post conv (and the skip sum at `hidden` width) disappears.
- tanh(a) * sigmoid(b) is computed as (2 * sigmoid(2a) - 1) * sigmoid(b) with the 2 folded into
  the in_layer weights: one sigmoid over all gate channels instead of two ops on strided halves.
- Flips are folded into the pre/post weights (reversed input / output channels), so the latent
  is never flipped; its two halves are kept as separate tensors and updated in place.
Weights are copied into non-persistent buffers (from whatever dtype the flow has when prepared):
the module's state_dict stays the VITS one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.piper.flow import CouplingLayer, Flow

CL = torch.channels_last


def _w2d(w: torch.Tensor) -> torch.Tensor:
    """[O, I, K] conv1d weight -> [O, I, 1, K] channels-last conv2d weight."""
    return w.unsqueeze(2).contiguous(memory_format=CL)


class _Coupling(nn.Module):
    """One mean-only coupling layer's reverse step on the latent's two halves, kept apart."""

    def __init__(self, layer: CouplingLayer, src: int, rev_in: bool, rev_out: bool) -> None:
        super().__init__()
        enc, h = layer.enc, layer.enc.hidden
        self.hidden, self.n_layers, self.src = h, enc.n_layers, src
        pre_w = layer.pre.weight.detach()
        # a half stored in reversed channel order: reverse the weights that read / write it instead
        self.register_buffer("pre_w", _w2d(pre_w.flip(1) if rev_in else pre_w), persistent=False)
        self.register_buffer("pre_b", layer.pre.bias.detach().clone(), persistent=False)
        post_w, post_b = layer.post.weight.detach()[:, :, 0], layer.post.bias.detach()  # [half, hidden]
        if rev_out:
            post_w, post_b = post_w.flip(0), post_b.flip(0)
        # gate: tanh(a) = 2 * sigmoid(2a) - 1, so the tanh half's weights and bias are doubled
        gate = torch.ones(2 * h, dtype=post_w.dtype, device=post_w.device)
        gate[:h] = 2.0
        # folded in float64, then rounded once to the flow's dtype: the same weights always give
        # the same buffers (an fp32 matmul's rounding can depend on the buffers' alignment)
        dtype, post64 = post_w.dtype, post_w.double()
        skip_b = post_b.double()
        for i, (conv_in, conv_rs) in enumerate(zip(enc.in_layers, enc.res_skip_layers)):
            self.register_buffer(f"in_w{i}", _w2d(conv_in.weight.detach() * gate.view(-1, 1, 1)), persistent=False)
            self.register_buffer(f"in_b{i}", conv_in.bias.detach() * gate, persistent=False)
            w, b = conv_rs.weight.detach()[:, :, 0].double(), conv_rs.bias.detach().double()
            if i < self.n_layers - 1:  # [res (h); skip (h)] -> [res (h); post @ skip (half)]
                w = torch.cat([w[:h], post64 @ w[h:]])
                skip_b = skip_b + post64 @ b[h:]
                b = torch.cat([b[:h], torch.zeros_like(skip_b)])
            else:  # the last conv is all skip; it also carries every skip's bias and post's
                w = post64 @ w
                skip_b = skip_b + post64 @ b
                b = skip_b
            self.register_buffer(f"rs_w{i}", _w2d(w.to(dtype).unsqueeze(-1)), persistent=False)
            self.register_buffer(f"rs_b{i}", b.to(dtype).contiguous(), persistent=False)
        self.pads = [(0, c.padding[0]) for c in enc.in_layers]
        self.dils = [(1, c.dilation[0]) for c in enc.in_layers]
        # speaker conditioning: one 1x1 conv per call gives a per-item bias of every in_layer,
        # its tanh halves doubled like the in_layers'
        self.has_cond = enc.cond_layer is not None
        if self.has_cond:
            scale = gate.repeat(self.n_layers)
            self.register_buffer("cond_w", enc.cond_layer.weight.detach() * scale.view(-1, 1, 1), persistent=False)
            self.register_buffer("cond_b", enc.cond_layer.bias.detach() * scale, persistent=False)

    def forward(self, halves: list[torch.Tensor], keep: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """halves[1 - src] -= WaveNet(halves[src]), in place; halves are [B, half, 1, T] channels-last."""
        h = self.hidden
        x = F.conv2d(halves[self.src], self.pre_w, self.pre_b)
        if keep is not None:
            x.mul_(keep)
        gc = F.conv1d(g, self.cond_w, self.cond_b).unsqueeze(2) if g is not None and self.has_cond else None
        out = None
        for i in range(self.n_layers):
            a = F.conv2d(x, getattr(self, f"in_w{i}"), getattr(self, f"in_b{i}"),
                         padding=self.pads[i], dilation=self.dils[i])
            if gc is not None:
                a += gc[:, 2 * h * i:2 * h * (i + 1)]
            s = torch.sigmoid_(a)
            acts = s[:, :h].mul(2.0).sub_(1.0).mul_(s[:, h:])
            rs = F.conv2d(acts, getattr(self, f"rs_w{i}"), getattr(self, f"rs_b{i}"))
            if i < self.n_layers - 1:
                x = x.add_(rs[:, :h])
                if keep is not None:
                    x.mul_(keep)
                skip = rs[:, h:]
            else:
                skip = rs
            out = skip if out is None else out.add_(skip)
        if keep is not None:
            out.mul_(keep)
        halves[1 - self.src].sub_(out)


class FastFlow(nn.Module):
    """Channels-last execution of a mean-only `Flow`'s weights; call like the flow."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        couplings = [m for m in flow.flows if isinstance(m, CouplingLayer)]
        if not all(c.mean_only for c in couplings):
            raise ValueError("FastFlow supports mean-only coupling layers")
        self.half = couplings[0].half
        # The latent is never flipped: z's two halves stay where they are, and `flipped` says
        # whether the flow's current channel order is z's reversed (x0 = reversed second half).
        flipped, steps = False, []
        for layer in reversed(flow.flows):
            if isinstance(layer, CouplingLayer):
                steps.append(_Coupling(layer, src=1 if flipped else 0, rev_in=flipped, rev_out=flipped))
            else:
                flipped = not flipped
        self.steps = nn.ModuleList(steps)
        self.flipped = flipped

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T] -> [B, C, T]."""
        halves = [part.unsqueeze(2).clone(memory_format=CL) for part in z.split(self.half, dim=1)]
        keep = mask.unsqueeze(2) if mask is not None else None
        for step in self.steps:
            step(halves, keep, g)
        out = torch.cat(halves, dim=1).squeeze(2)
        return out.flip(1) if self.flipped else out
