"""The flow's token encoder (upstream ``UpsampleConformerEncoder``): speech-token embeddings -> 2x
upsampled hidden states, one per mel frame.

    embed (Linear + LayerNorm, x sqrt(width)) -> pre-lookahead convs (each token also reads the next 3)
    -> 6 conformer blocks (relative-position self-attention + SiLU feed-forward, pre-norm)
    -> nearest 2x upsampling + causal conv -> up_embed -> 4 conformer blocks -> after_norm

When streaming, attention is chunk-causal (chunks of 25 tokens, then 50 frames, counted from the
first prompt token) so a finished chunk never changes; with a :class:`LayerState` the encoder
computes only new tokens, reading the keys/values and conv context the earlier ones left.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.cosyvoice.flow.config import FlowConfig
from edge_runtime.models.cosyvoice.flow.incremental import CausalConv1d, LayerState, WindowedConv1d, chunk_mask


def relative_positions(newest: int, oldest: int, width: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """Sinusoids of the query-minus-key distances ``newest, newest - 1, ..., oldest`` [L, width]
    (ESPnet's relative encoding: sin/cos interleaved, the same values upstream tabulates)."""
    distance = torch.arange(newest, oldest - 1, -1, dtype=torch.float32, device=device)
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / width))
    angle = distance[:, None] * freq[None, :]
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1).to(dtype)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(width) as the relative-position encoding does."""

    def __init__(self, in_size: int, width: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_size, width), nn.LayerNorm(width, eps=1e-5))
        self.scale = math.sqrt(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionAttention(nn.Module):
    """Transformer-XL style attention: score = (q + u) . k + (q + v) . W_pos pos(i - j), over sqrt(d)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.linear_q = nn.Linear(width, width)
        self.linear_k = nn.Linear(width, width)
        self.linear_v = nn.Linear(width, width)
        self.linear_out = nn.Linear(width, width)
        self.linear_pos = nn.Linear(width, width, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                state: LayerState | None) -> torch.Tensor:
        """x [B, C, width] (the new positions), pos [keys + C - 1, width] from :func:`relative_positions`
        (distances keys - 1 down to -(C - 1)), mask [C, keys] or None."""
        b, c, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.linear_q(x).view(b, c, h, d)
        k = self.linear_k(x).view(b, c, h, d)
        v = self.linear_v(x).view(b, c, h, d)
        if state is not None:
            k, v = state.keys_values(self, k, v)
        keys = k.shape[1]
        span = pos.shape[0]
        p = self.linear_pos(pos).view(span, h, d).transpose(0, 1)
        q_content = (q + self.pos_bias_u).transpose(1, 2)
        q_position = (q + self.pos_bias_v).transpose(1, 2)
        by_distance = torch.matmul(q_position, p.transpose(1, 2))  # [B, H, C, span]
        # query i (i-th new position) and key j are (keys - C + i) - j apart: row i of by_distance read
        # from column C - 1 - i on (the "relative shift", as a strided view)
        bias = by_distance.as_strided((b, h, c, keys), (h * c * span, c * span, span - 1, 1),
                                      by_distance.storage_offset() + c - 1)
        bias = bias * (1.0 / math.sqrt(d))
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q_content, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return self.linear_out(out.transpose(1, 2).reshape(b, c, h * d))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(width, hidden)
        self.w_2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm attention + feed-forward (CosyVoice2 uses neither the conv module nor macaron FFN)."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(width, heads)
        self.feed_forward = FeedForward(width, hidden)
        self.norm_ff = nn.LayerNorm(width, eps=1e-12)
        self.norm_mha = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                state: LayerState | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos, mask, state)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Each token reads itself and the next ``lookahead`` tokens (conv1), then a causal conv3 (conv2),
    added to the input. Past the sequence end the look-ahead reads zeros."""

    def __init__(self, width: int, lookahead: int, channels: int | None = None) -> None:
        super().__init__()
        self.lookahead = lookahead
        channels = channels or width  # the hidden width between the two convs (CosyVoice3: 80 -> 1024 -> 80)
        self.conv1 = WindowedConv1d(width, channels, lookahead + 1)
        self.conv2 = CausalConv1d(channels, width, 3)

    def forward(self, x: torch.Tensor, ahead: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        """x [1, N, W] embedded tokens, ahead [1, <= lookahead, W] the embedded tokens after them."""
        h = F.pad(torch.cat([x, ahead], dim=1), (0, 0, 0, self.lookahead - ahead.shape[1]))
        return self.conv2(F.leaky_relu(self.conv1(h)), state) + x


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by ``stride`` then a causal conv of width 2 * stride + 1."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = CausalConv1d(width, width, 2 * stride + 1)

    def forward(self, x: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        """[B, N, C] -> [B, N * stride, C]."""
        return self.conv(x.repeat_interleave(self.stride, dim=1), state)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        w = cfg.encoder_size
        self.width = w
        self.ratio = cfg.token_mel_ratio
        self.chunk = cfg.chunk_tokens
        self.embed = LinearEmbed(cfg.input_size, w)
        # upstream hard-codes 512 channels here; the yaml's width is the same number at the published size
        self.pre_lookahead_layer = PreLookahead(w, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerBlock(w, cfg.encoder_heads, cfg.encoder_ffn)
                                      for _ in range(cfg.encoder_blocks))
        self.up_layer = Upsample(w, cfg.token_mel_ratio)
        self.up_embed = LinearEmbed(cfg.input_size, w)
        self.up_encoders = nn.ModuleList(ConformerBlock(w, cfg.encoder_heads, cfg.encoder_ffn)
                                         for _ in range(cfg.encoder_up_blocks))
        self.after_norm = nn.LayerNorm(w, eps=1e-5)

    def forward(self, x: torch.Tensor, ahead: torch.Tensor, *, chunked: bool, start: int = 0,
                state: LayerState | None = None) -> torch.Tensor:
        """Token embeddings x [1, N, input_size] at positions ``start..start+N`` (and ``ahead``, the up
        to ``lookahead`` token embeddings after them) -> [1, N * ratio, width].

        ``chunked``: chunk-causal attention (streaming); else every position sees every other.
        ``state`` (chunked only) holds what positions ``0..start`` left; without it ``start`` is 0."""
        if state is not None and not chunked:
            raise ValueError("incremental encoding needs chunk-causal attention (chunked=True)")
        if state is None and start:
            raise ValueError("start > 0 needs the state of the positions before it")
        h = self.pre_lookahead_layer(self.embed(x), self.embed(ahead), state)
        h = self._blocks(self.encoders, h, start, self.chunk if chunked else 0, state)
        h = self.up_embed(self.up_layer(h, state))
        h = self._blocks(self.up_encoders, h, start * self.ratio, self.chunk * self.ratio if chunked else 0, state)
        return self.after_norm(h)

    def _blocks(self, blocks: nn.ModuleList, h: torch.Tensor, start: int, chunk: int,
                state: LayerState | None) -> torch.Tensor:
        n = h.shape[1]
        keys = start + n
        pos = relative_positions(keys - 1, -(n - 1), self.width, h.dtype, h.device)
        mask = chunk_mask(start, n, keys, chunk, h.device) if chunk else None
        for block in blocks:
            h = block(h, pos, mask, state)
        return h
