"""The flow's velocity estimator in CosyVoice3 (upstream ``cosyvoice/flow/DiT/dit.py``): a DiT.

    [noisy mel, prompt mel, mu, speaker] (4 x 80) -> Linear + causal conv position embedding
    -> 22 x DiT block (AdaLN-zero self-attention with rotary positions + GELU feed-forward)
    -> AdaLN (scale, shift) -> Linear -> velocity (80)

Attention is full offline and chunk-causal when streaming (50-frame chunks from the first prompt
frame, unlimited left context: upstream's ``num_decoding_left_chunks`` is ignored by its own mask
function). The conv position embedding is causal and everything else works per frame, so a
finished chunk never changes: with a :class:`LayerState` per flow time the estimator computes only
new frames, reading the rotated keys/values and conv context the earlier ones left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.cosyvoice.dit.config import DiTFlowConfig
from edge_runtime.models.cosyvoice.dit.layers import (NORM_EPS, DiTBlock, InputEmbedding, Modulation,
                                                      RotaryEmbedding, TimestepEmbedding)
from edge_runtime.models.cosyvoice.flow.incremental import LayerState


class DiTEstimator(nn.Module):
    def __init__(self, cfg: DiTFlowConfig) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedding(cfg.dim, cfg.time_freq_dim)
        self.input_embed = InputEmbedding(cfg.estimator_in_channels, cfg.dim, cfg.conv_pos_kernel,
                                          cfg.conv_pos_groups)
        self.rotary_embed = RotaryEmbedding(cfg.head_dim, cfg.rotary_base)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.head_dim, cfg.ff_inner)
                                                for _ in range(cfg.depth))
        self.norm_out = Modulation(cfg.dim, 2)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_bins)

    def placement_units(self) -> list[nn.Module]:
        """The modules, in call order, an offloading backend may place one by one: each is only ever
        run through its own forward. The time embedding and every AdaLN projection run in
        :meth:`time_biases` (once per request), apart from the blocks' attention and feed-forward
        (once per Euler step and chunk), so they are units of their own."""
        blocks = list(self.transformer_blocks)
        per_request = [self.time_embed, *(block.attn_norm for block in blocks), self.norm_out]
        per_step = [self.rotary_embed, self.input_embed]
        for block in blocks:
            per_step += [block.attn, block.ff]
        return [*per_request, *per_step, self.proj_out]

    def time_biases(self, t: torch.Tensor) -> list[list[torch.Tensor]]:
        """Flow times t [S] -> per step: each block's AdaLN-zero modulation [1, 6 x dim], then the
        final AdaLN's [1, 2 x dim] (they depend on the flow time only)."""
        emb = self.time_embed(t)
        per_layer = [block.attn_norm(emb) for block in self.transformer_blocks] + [self.norm_out(emb)]
        return [[mod[s:s + 1] for mod in per_layer] for s in range(t.shape[0])]

    def forward(self, x: torch.Tensor, time_biases: Sequence[torch.Tensor], mask: torch.Tensor | None,
                state: LayerState | None = None) -> torch.Tensor:
        """x [B, T, 320] (channels last: noisy mel, prompt mel, mu, speaker) -> velocity [B, T, 80];
        time_biases: one step's entry of :meth:`time_biases`; mask [T, keys] (True = attend) or None;
        state: what earlier frames left at this flow time."""
        frames = x.shape[1]
        start = 0
        if state is not None:
            # how many frames came before: a frame counter kept in the state itself, so it follows
            # the state's own rules (copied by fork, not advanced when keep is False)
            marker = x.new_zeros(1, frames, 1, 1)
            start = state.keys_values(self.rotary_embed, marker, marker)[0].shape[1] - frames
        cos, sin = self.rotary_embed(start, start + frames)
        cos, sin = cos.to(x.device), sin.to(x.device)
        h = self.input_embed(x, state)
        for block, modulation in zip(self.transformer_blocks, time_biases):
            h = block(h, modulation, cos, sin, mask, state)
        scale, shift = time_biases[-1][:, None, :].chunk(2, dim=-1)  # upstream's order: scale first
        h = F.layer_norm(h, h.shape[-1:], eps=NORM_EPS) * (1 + scale) + shift
        return self.proj_out(h)
