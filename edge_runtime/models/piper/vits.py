"""PiperVits: a PyTorch VITS for Piper voices, numerically matching Piper's ONNX graphs.

Four named stages a runtime can place or offload one by one:
  text_encoder -> duration_predictor -> (expand to frames) -> flow -> decoder
Each has its own method (`encode`, `predict_durations`, `expand`, `flow_reverse`, `decode`);
`forward` chains them. Randomness is explicit: pass a `torch.Generator` for reproducible audio;
noise scales of 0 give deterministic output without drawing any random numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.piper.config import VitsHyperParams
from edge_runtime.models.piper.decoder import Decoder
from edge_runtime.models.piper.duration import DurationPredictor
from edge_runtime.models.piper.fast_decoder import FastDecoder, bucket_length
from edge_runtime.models.piper.fast_flow import FastFlow
from edge_runtime.models.piper.flow import Flow
from edge_runtime.models.piper.text_encoder import TextEncoder, masked

MODES = ("fast", "eager")  # fastest first; see prepare_for_inference

__all__ = ["PiperVits", "MODES", "Encoded", "Expanded", "TextEncoder", "DurationPredictor", "Flow", "Decoder"]

# our submodule names <-> the original VITS prefixes used in Piper's ONNX initializers
VITS_PREFIXES = {"text_encoder": "enc_p", "duration_predictor": "dp", "flow": "flow",
                 "decoder": "dec", "speaker_embedding": "emb_g"}


class Encoded(NamedTuple):
    hidden: torch.Tensor  # [B, H, T] encoder output (duration predictor input)
    m: torch.Tensor  # [B, C, T] prior mean per phoneme
    logs: torch.Tensor  # [B, C, T] prior log-std per phoneme
    mask: torch.Tensor | None  # [B, 1, T], None when nothing is padded
    lengths: torch.Tensor  # [B]
    width: int  # T as given; tensors may be longer (bucketed), the extra columns masked


class Expanded(NamedTuple):
    m: torch.Tensor  # [B, C, F] per frame
    logs: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, F], None when every item has F frames
    lengths: torch.Tensor  # [B] frames
    width: int  # frames of the longest item; tensors may be longer (bucketed)


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor | None:
    """[B, 1, max_len] float mask, or None when every sequence fills max_len."""
    if bool((lengths >= max_len).all()):
        return None
    steps = torch.arange(max_len, device=lengths.device)
    return (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).float()


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without random init (~0.1 s here) when every weight is loaded right after.

    Cheaper than the meta device, whose first use imports torch's decomposition machinery (~1 s).
    """
    names = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class PiperVits(nn.Module):
    def __init__(self, hp: VitsHyperParams) -> None:
        super().__init__()
        self.hparams = hp
        self.hop_length = hp.hop_length
        gin = hp.gin_channels if hp.n_speakers > 1 else 0
        self.text_encoder = TextEncoder(hp.n_vocab, hp.inter_channels, hp.hidden_channels, hp.filter_channels,
                                        hp.n_heads, hp.n_layers, hp.kernel_size, hp.window_size, hp.heads_share)
        self.duration_predictor = DurationPredictor(
            hp.hidden_channels, hp.dp_filter_channels, hp.dp_kernel_size, hp.dp_n_layers, hp.dp_n_flows,
            hp.dp_flow_n_layers, hp.dp_num_bins, hp.dp_tail_bound, hp.dp_dilations, hp.dp_flow_dilations, gin)
        self.flow = Flow(hp.inter_channels, hp.hidden_channels, hp.wn_kernel_size, hp.wn_dilations,
                         hp.n_flows, gin, hp.mean_only)
        self.decoder = Decoder(hp.inter_channels, hp.upsample_initial_channel, hp.upsample_rates,
                               hp.upsample_kernel_sizes, hp.upsample_paddings, hp.resblock,
                               hp.resblock_kernel_sizes, hp.resblock_dilation_sizes, hp.pre_kernel_size,
                               hp.post_kernel_size, hp.post_bias, gin)
        self.speaker_embedding = nn.Embedding(hp.n_speakers, hp.gin_channels) if gin else None
        self.optimization = "eager"
        self.bucketing = False  # pad lengths to few sizes (masked): oneDNN kernels get reused

    def prepare_for_inference(self, mode: str = "fast", tile_samples: int = 16384) -> PiperVits:
        """Choose how the stages execute; call again after changing weights. Returns self.

        "fast" (default): the decoder runs channels-last in fixed windows (FastDecoder, ~2.5x faster
        on CPU) and phoneme/frame lengths are padded to bucketed sizes under masks, so new sentence
        lengths reuse oneDNN's conv kernels; within ~1e-6 of "eager". "eager": the plain modules.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        self.eval()
        self.decoder.fast = FastDecoder(self.decoder, tile_samples) if mode == "fast" else None
        fast_flow = mode == "fast" and self.flow.mean_only
        self.flow.fast = FastFlow(self.flow) if fast_flow else None
        self.bucketing = mode == "fast"
        self.optimization = mode
        return self

    # -- stages ----------------------------------------------------------------------------------
    def speaker(self, speaker_id: torch.Tensor | int | None, batch: int,
                device: torch.device | None = None) -> torch.Tensor | None:
        """Speaker conditioning g [B, gin, 1]; None for single-speaker voices. ``device``: where the
        model computes (the table itself may be offloaded between uses)."""
        if self.speaker_embedding is None:
            return None
        device = device or self.speaker_embedding.weight.device
        sid = torch.as_tensor(0 if speaker_id is None else speaker_id, dtype=torch.long, device=device)
        sid = sid.reshape(-1).expand(batch) if sid.numel() == 1 else sid.reshape(batch)
        n = self.speaker_embedding.num_embeddings
        if bool(((sid < 0) | (sid >= n)).any()):
            raise ValueError(f"speaker id {sid.tolist()} out of range: this voice has speakers 0..{n - 1}")
        return self.speaker_embedding(sid).unsqueeze(-1)

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        width = ids.shape[1]
        if self.bucketing:
            ids = F.pad(ids, (0, bucket_length(width) - width))
        mask = sequence_mask(lengths, ids.shape[1])
        if mask is not None:  # the mask multiplies activations: keep it in the encoder's precision
            mask = mask.to(self.text_encoder.emb.weight.dtype)
        hidden, m, logs = self.text_encoder(ids, mask)
        return Encoded(hidden, m, logs, mask, lengths, width)

    def predict_durations(self, enc: Encoded, noise_w: float = 0.8, length_scale: float = 1.0,
                          g: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Whole frames per phoneme [B, T] (float; 0 for padding)."""
        b, _, t = enc.hidden.shape
        noise = enc.hidden.new_zeros(b, 2, t)
        if noise_w:  # drawn at the given width: the same seed gives the same voice, bucketed or not
            noise[..., :enc.width] = _randn_like(noise[..., :enc.width], generator) * noise_w
        logw = self.duration_predictor(enc.hidden, enc.mask, noise, g)
        w = masked(torch.exp(logw), enc.mask) * length_scale
        return torch.ceil(w)[:, 0, :enc.width]

    def expand(self, enc: Encoded, durations: torch.Tensor) -> Expanded:
        """Repeat each phoneme's prior for its frames (a gather; same values as VITS' path matmul)."""
        frames = torch.clamp_min(durations.sum(dim=1), 1).long()
        width = int(frames.max())
        n = bucket_length(width) if self.bucketing else width
        ends = torch.cumsum(durations, dim=1)  # exact: integers in float32
        steps = torch.arange(n, device=durations.device, dtype=durations.dtype)
        idx = torch.searchsorted(ends, steps.expand(ends.shape[0], n).contiguous(), right=True)
        idx = idx.clamp_(max=durations.shape[1] - 1).unsqueeze(1)
        mask = sequence_mask(frames, n)
        covered = (steps.unsqueeze(0) < ends[:, -1:]).unsqueeze(1)  # frames past the last phoneme stay 0

        def gather(stats: torch.Tensor) -> torch.Tensor:
            out = stats.gather(2, idx.expand(-1, stats.shape[1], -1))
            return out if bool(covered.all()) else out * covered

        return Expanded(gather(enc.m), gather(enc.logs), mask, frames, width)

    def flow_reverse(self, prior: Expanded, noise_scale: float = 0.667, g: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the prior and run the flow backwards: decoder input z [B, C, F] (masked)."""
        z, width = prior.m, prior.width
        if noise_scale:
            noise = torch.zeros_like(z)
            noise[..., :width] = _randn_like(noise[..., :width], generator)
            z = z + noise * torch.exp(prior.logs) * noise_scale
        return masked(self.flow(z, prior.mask, g), prior.mask)[..., :width]

    def decode(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, F] -> [B, F * hop] waveform in [-1, 1]."""
        return self.decoder(z, g)

    def decode_chunks(self, z: torch.Tensor, g: torch.Tensor | None = None, chunk_frames: int = 64,
                      growth: int = 1) -> Iterator[torch.Tensor]:
        """Decode `chunk_frames` frames first, each next chunk `growth` times larger (for streaming:
        a small first chunk, then few seams); a tail shorter than the next chunk joins the current
        one. The pieces join into `decode(z)`: each is computed with the decoder's receptive field of
        context either side, so the seams are exact (to float rounding), at the cost of that overlap.
        """
        n = z.shape[-1]
        halo = self.decoder.receptive_field()
        hop = self.hop_length
        a, size = 0, chunk_frames
        while a < n:
            b = min(a + size, n)
            if n - b < size * growth:  # fold a short tail into this chunk
                b = n
            lo, hi = max(a - halo, 0), min(b + halo, n)
            audio = self.decode(z[..., lo:hi], g)
            yield audio[:, (a - lo) * hop:((b - lo) * hop if b < n else None)]
            a, size = b, size * growth

    # -- all together ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, phoneme_ids: torch.Tensor, lengths: torch.Tensor, noise_scale: float = 0.667,
                length_scale: float = 1.0, noise_w: float = 0.8, speaker_id: torch.Tensor | int | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Phoneme ids [B, T] (padded) and lengths [B] -> audio [B, samples], samples per item [B]."""
        g = self.speaker(speaker_id, phoneme_ids.shape[0])
        enc = self.encode(phoneme_ids, lengths)
        durations = self.predict_durations(enc, noise_w, length_scale, g, generator)
        prior = self.expand(enc, durations)
        z = self.flow_reverse(prior, noise_scale, g, generator)
        audio = self.decode(z, g)
        return audio, prior.lengths * self.hop_length
