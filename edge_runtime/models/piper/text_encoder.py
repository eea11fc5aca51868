"""VITS text encoder: phoneme embedding -> transformer with relative-position attention -> (m, logs).

Masks are [B, 1, T] float tensors, or None when no sequence in the batch is padded (the common
batch-of-one case), which skips every mask multiply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class LayerNorm(nn.Module):
    """Layer norm over the channel axis of a [B, C, T] tensor (VITS keeps gamma/beta names)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps)
        return y.transpose(1, -1)


class RelativeAttention(nn.Module):
    """Multi-head self-attention with learned relative-position keys/values within +-window."""

    def __init__(self, channels: int, n_heads: int, window_size: int, heads_share: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        rel_heads = 1 if heads_share else n_heads
        self.emb_rel_k = nn.Parameter(torch.zeros(rel_heads, 2 * window_size + 1, self.k_channels))
        self.emb_rel_v = nn.Parameter(torch.zeros(rel_heads, 2 * window_size + 1, self.k_channels))

    @staticmethod
    def _band(x: torch.Tensor, w: int) -> torch.Tensor:
        """View of the 2w+1 diagonals of a [b, h, t, t + 2w] tensor whose columns are offset by w:
        band[..., i, o + w] is column i + o of the unpadded matrix (offsets -w..w)."""
        b, h, t, _ = x.shape
        s0, s1, s2, s3 = x.stride()
        return x.as_strided((b, h, t, 2 * w + 1), (s0, s1, s2 + s3, s3), x.storage_offset())

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, d, t = x.shape
        h, kc, w = self.n_heads, self.k_channels, self.window_size
        q = self.conv_q(x).view(b, h, kc, t).transpose(2, 3) / math.sqrt(kc)
        k = self.conv_k(x).view(b, h, kc, t)  # already transposed for q @ k
        v = self.conv_v(x).view(b, h, kc, t).transpose(2, 3)
        # Relative positions only matter within +-w (VITS zero-pads its tables beyond), so instead of
        # [t, 2t-1] logits and the pad-and-reshape trick we touch just the 2w+1 diagonals.
        scores = F.pad(q @ k, (w, w))
        self._band(scores, w).add_(q @ self.emb_rel_k.transpose(1, 2).unsqueeze(0))
        scores = scores[..., w:w + t]
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, -1e4)
        p = torch.softmax(scores, dim=-1)
        p_band = self._band(F.pad(p, (w, w)), w)  # weights by relative offset, 0 past the ends
        out = p @ v + p_band @ self.emb_rel_v.unsqueeze(0)
        return self.conv_o(out.transpose(2, 3).reshape(b, d, t))


class FeedForward(nn.Module):
    """Two 'same'-padded convolutions with a ReLU between, masked before each."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.pad = (kernel_size - 1) // 2, kernel_size // 2
        same = self.pad[0] if self.pad[0] == self.pad[1] else 0  # symmetric: let the conv pad
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=same)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding=same)
        self.explicit_pad = self.pad[0] != self.pad[1]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad) if self.explicit_pad else x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = torch.relu(self.conv_1(self._pad(masked(x, mask))))
        return masked(self.conv_2(self._pad(masked(x, mask))), mask)


class Encoder(nn.Module):
    """Post-norm transformer: attention and FFN, each with a residual and a layer norm."""

    def __init__(self, hidden: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int, window_size: int, heads_share: bool = True) -> None:
        super().__init__()
        self.attn_layers = nn.ModuleList(
            RelativeAttention(hidden, n_heads, window_size, heads_share) for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FeedForward(hidden, filter_channels, kernel_size) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn_mask = None if mask is None else (mask.unsqueeze(2) * mask.unsqueeze(-1)) == 0
        x = masked(x, mask)
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1,
                                             self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x, attn_mask))
            x = norm_2(x + ffn(x, mask))
        return masked(x, mask)


class TextEncoder(nn.Module):
    """ids [B, T] -> hidden [B, H, T] (the duration predictor's input), m and logs [B, C, T]."""

    def __init__(self, n_vocab: int, out_channels: int, hidden: int, filter_channels: int,
                 n_heads: int, n_layers: int, kernel_size: int, window_size: int,
                 heads_share: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.scale = math.sqrt(hidden)
        self.emb = nn.Embedding(n_vocab, hidden)
        self.encoder = Encoder(hidden, filter_channels, n_heads, n_layers, kernel_size, window_size, heads_share)
        self.proj = nn.Conv1d(hidden, out_channels * 2, 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None):
        x = (self.emb(ids) * self.scale).transpose(1, 2)
        x = self.encoder(x, mask)
        m, logs = masked(self.proj(x), mask).split(self.out_channels, dim=1)
        return x, m, logs
