"""CosyVoice3's causal HiFT vocoder (mel -> 24 kHz waveform), written for edge_runtime.

Same architecture and parameter names as CosyVoice2's :mod:`.hift` (NSF source + HiFi-GAN upsampler +
16-point iSTFT, 480 samples per mel frame), made causal so that a growing mel can be vocoded in pieces:

- every convolution sees only current and past inputs (zeros padded on the left), except two that
  look ahead: ``conv_pre`` (``conv_pre_look_right`` = 4 frames) and the F0 predictor's first conv
  (kernel 4: 3 frames);
- the transposed upsampling convs become nearest upsampling followed by a left-padded conv;
- the source's per-frame phase is held between frames (nearest, not linear, upsampling to samples),
  so a sample's excitation depends only on the F0 of its own and earlier frames.

``finalize=False`` is upstream's streaming call: the last frames serve as look-ahead instead of
zeros, and only the samples that no later frame can change are returned (``480 * (T - 8)`` of them
for ``T`` frames). :mod:`.hift_causal_stream` builds incremental vocoding on it.

Numerics kept from upstream on purpose:

- the F0 predictor runs in float64 (upstream casts it to float64 before every call) and its output
  is rounded back to the mel's dtype. The source phase is a running sum over all frames, so a
  one-ulp F0 change in one frame shifts the phase of every later sample; in float64 the F0 of a
  frame rounds to the same float32 whichever length of mel it was computed in.
- the running phase sum is accumulated in float64 and rounded to float32, which is what torch's CPU
  cumsum does for float32 and what upstream therefore computes on the CPU; it also continues exactly
  across pieces (the carry is float64).

Noise: upstream's causal source does not draw at inference. When the model is built it draws, from
the global RNG, an initial phase ``rand(1, 9)`` (which has no effect: it is added to the first sample,
which the per-frame phase never reads) and a fixed ``rand(1, 300 * 24000, 9)`` buffer of UNIFORM
[0, 1) noise that every call reads from sample 0 (so upstream cannot vocode more than 300 s).
:class:`SourceNoise` draws the same values, in the same order, lazily from a ``torch.Generator``;
:func:`upstream_noise_generator` positions a generator where upstream's model construction leaves
the global RNG (its flow seeds 0 just before), so the published pipeline's noise is reproduced.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice.folder import V3_YAML
from edge_runtime.models.cosyvoice.hift import (
    HarmonicSource, HiFTConfig, LeftPaddedConv1d, SnakeResBlock, _legacy_weight_norm_hook, fuse_stage,
    source_stft, spectrum_to_wave)

# Upstream's CausalConditionalCFM draws its flow noise right after seeding 0, before the model's
# remaining layers are built; see upstream_noise_generator.
_CFM_NOISE_SHAPE = (1, 80, 50 * 300)


@dataclass(frozen=True)
class CausalHiFTConfig(HiFTConfig):
    """The ``hift:`` section of ``cosyvoice3.yaml`` (defaults: Fun-CosyVoice3-0.5B's, which equal
    CosyVoice2's numbers plus the 4-frame look-ahead of ``conv_pre``)."""

    conv_pre_look_right: int = 4

    @classmethod
    def from_section(cls, hift: dict, sample_rate: int | None = None) -> CausalHiFTConfig:
        cfg = super().from_section(hift, sample_rate)
        look = hift.get("conv_pre_look_right", cls.conv_pre_look_right)
        try:
            look = int(look)
        except (TypeError, ValueError):
            raise InvalidInputError(f"hift.conv_pre_look_right: {look!r} is not allowed; use an integer >= 0") from None
        if look < 0:
            raise InvalidInputError(f"hift.conv_pre_look_right: {look} is not allowed; use an integer >= 0")
        return dataclasses.replace(cfg, conv_pre_look_right=look)


def _weight64(conv: nn.Conv1d | nn.Linear) -> torch.Tensor:
    """The layer's weight computed in float64. For a weight-normed layer the norm is taken in float64
    from the stored direction and gain, as upstream's parametrization does after its float64 cast."""
    if parametrize.is_parametrized(conv, "weight"):
        p = conv.parametrizations.weight
        return torch._weight_norm(p.original1.double(), p.original0.double(), 0)
    return conv.weight.double()


class CausalConvF0Predictor(nn.Module):
    """Mel [B, C, T] -> F0 in Hz: a conv looking 3 frames ahead, four causal conv3 layers (ELU after
    each) and a linear head (absolute value), run in float64."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1):
        super().__init__()
        layers: list[nn.Module] = [weight_norm(nn.Conv1d(in_channels, cond_channels, 4)), nn.ELU()]
        for _ in range(4):
            layers += [weight_norm(nn.Conv1d(cond_channels, cond_channels, 3)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @property
    def lookahead(self) -> int:
        """Frames after a frame that its F0 depends on."""
        return self.condnet[0].kernel_size[0] - 1

    @property
    def left_context(self) -> int:
        """Frames before a frame that its F0 depends on."""
        return sum(m.kernel_size[0] - 1 for m in list(self.condnet)[2::2])

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """F0 [B, T] (``finalize``: zeros stand for the frames after the mel) or [B, T - 3] (the last
        3 frames only serve as look-ahead), in the mel's dtype."""
        x = mel.double()
        for i, layer in enumerate(self.condnet):
            if isinstance(layer, nn.Conv1d):
                pad = (0, self.lookahead if finalize else 0) if i == 0 else (layer.kernel_size[0] - 1, 0)
                x = F.conv1d(F.pad(x, pad), _weight64(layer), layer.bias.double())
            else:
                x = layer(x)
        f0 = F.linear(x.transpose(1, 2), _weight64(self.classifier), self.classifier.bias.double())
        return f0.squeeze(-1).abs().to(mel.dtype)


class SourceNoise:
    """The causal source's noise for one request, sample by sample: uniform [0, 1) values [1, n, H+1]
    in the order upstream's fixed buffer holds them. The first draw (upstream's unused initial phase,
    [1, H+1]) is made and dropped before the noise, so that a generator seeded ``s`` yields what
    upstream's source holds when it is built right after ``torch.manual_seed(s)``.
    ``initial_draw=False``: the generator's first values are the noise (a buffer drawn on its own)."""

    def __init__(self, harmonics: int, generator: torch.Generator, initial_draw: bool = True):
        if not isinstance(generator, torch.Generator):
            raise InvalidInputError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        self.harmonics = harmonics
        self.generator = generator
        self.drawn = 0  # samples handed out so far
        self._started = not initial_draw

    def take(self, samples: int) -> torch.Tensor:
        """The noise of the next ``samples`` samples, on the generator's device."""
        g = self.generator
        if not self._started:
            torch.rand(1, self.harmonics, generator=g, device=g.device)
            self._started = True
        self.drawn += samples
        return torch.rand(1, samples, self.harmonics, generator=g, device=g.device)


def upstream_noise_generator(cfg: CausalHiFTConfig | None = None, flow: dict | None = None) -> torch.Generator:
    """A CPU generator in the state upstream's global RNG is in when its CosyVoice3 source is built.

    Upstream builds the yaml's modules in order; its ``CausalConditionalCFM`` seeds 0 and draws its
    flow noise, then the flow's own token embedding (normal) and speaker projection (uniform) are
    initialised, then the vocoder's F0 predictor (uniform, layer by layer), then the source draws its
    noise. The same draws are made here (same shapes and kinds, so the same stretch of the random
    stream is used). ``flow`` is the yaml's ``flow:`` section (tags ignored; None: the published
    numbers)."""
    cfg = cfg or CausalHiFTConfig()
    flow = flow or {}
    try:
        vocab, width = int(flow.get("vocab_size", 6561)), int(flow.get("input_size", 80))
        spk, out = int(flow.get("spk_embed_dim", 192)), int(flow.get("output_size", 80))
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"flow section: a non-integer size ({e}); vocab_size, input_size, "
                                "spk_embed_dim and output_size must be integers") from None
    g = torch.Generator().manual_seed(0)
    torch.randn(_CFM_NOISE_SHAPE, generator=g)
    torch.empty(vocab, width).normal_(generator=g)
    c, cin = cfg.f0_cond_channels, cfg.f0_in_channels
    shapes = [(out, spk), (out,), (c, cin, 4), (c,), *[(c, c, 3), (c,)] * 4, (cfg.f0_num_class, c), (cfg.f0_num_class,)]
    for shape in shapes:  # kaiming-uniform weights and uniform biases: one uniform draw per element
        torch.empty(shape).uniform_(generator=g)
    return g


class CausalHarmonicSource(HarmonicSource):
    """NSF source of the causal vocoder: per-frame F0 -> harmonics 1..H+1 (+ noise) merged by Linear + tanh.

    The phase advances once per frame (the sum of the frame's cycles times the samples per frame) and
    is held over the frame's samples; ``carry`` [B, H+1] (float64) is the cycle sum of the frames
    before, so a mel vocoded in pieces gets the phase of one vocoded whole."""

    def forward(self, f0: torch.Tensor, noise: torch.Tensor,  # type: ignore[override]
                carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, T] Hz per frame, noise [B or 1, T * samples_per_frame, H+1] uniform in [0, 1)
        -> (excitation [B, 1, T * samples_per_frame], carry after the last frame)."""
        mult = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype)
        cycles = ((f0[..., None] * mult) / self.sampling_rate) % 1  # [B, T, H+1]
        summed = cycles.double()
        if carry is not None:
            summed = torch.cat([carry[:, None].to(summed), summed], dim=1)
        summed = torch.cumsum(summed, dim=1)
        if carry is not None:
            summed = summed[:, 1:]
        angle = summed.to(f0.dtype) * 2 * math.pi
        angle = (angle * self.upsample).repeat_interleave(self.upsample, dim=1)  # [B, S, H+1]
        sines = torch.sin(angle) * self.sine_amp
        voiced = (f0 > self.voiced_threshold).to(sines.dtype).repeat_interleave(self.upsample, dim=1)[..., None]
        amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        excitation = sines * voiced + amp * noise.to(sines)
        return torch.tanh(self.l_linear(excitation)).transpose(1, 2), summed[:, -1]


class CausalHiFTGenerator(nn.Module):
    """CosyVoice3 vocoder: ``forward(mel [B, 80, T]) -> waveform [B, T * 480]`` at 24 kHz.

    Parameter names and shapes are upstream's ``CausalHiFTGenerator`` ones, so ``hift.pt`` loads with
    ``strict=True`` (weight norm as ``parametrizations.weight.original0/1``; ``weight_g``/``weight_v``
    are renamed on load). Keep it in float32: the F0 predictor computes in float64 from its weights.
    """

    def __init__(self, cfg: CausalHiFTConfig | None = None):
        super().__init__()
        cfg = cfg or CausalHiFTConfig()
        if cfg.sampling_rate == 22050:
            raise NotImplementedError("CosyVoice1's 22.05 kHz source (SineGen v1) is not implemented")
        self.cfg = cfg
        c0, n_fft, rates = cfg.base_channels, cfg.n_fft, cfg.upsample_rates
        self.m_source = CausalHarmonicSource(cfg)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, c0, cfg.conv_pre_look_right + 1))  # looks right
        # nearest upsampling, then a causal conv (see decode)
        self.ups = nn.ModuleList(
            weight_norm(LeftPaddedConv1d(c0 >> i, c0 >> (i + 1), k, left=k - 1))
            for i, k in enumerate(cfg.upsample_kernel_sizes))
        # The source's STFT is brought to each stage's rate by strided causal convs (stride = the
        # upsampling still to come).
        strides = [math.prod(rates[i + 1:]) for i in range(len(rates))]
        self.source_downs = nn.ModuleList(
            LeftPaddedConv1d(n_fft + 2, c0 >> (i + 1), 1, left=0) if s == 1
            else LeftPaddedConv1d(n_fft + 2, c0 >> (i + 1), 2 * s, s, left=s - 1)
            for i, s in enumerate(strides))
        self.source_resblocks = nn.ModuleList(
            SnakeResBlock(c0 >> (i + 1), k, d, causal=True)
            for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)))
        self.resblocks = nn.ModuleList(
            SnakeResBlock(c0 >> (i + 1), k, d, causal=True)
            for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(LeftPaddedConv1d(c0 >> len(rates), n_fft + 2, 7, left=6))
        self.f0_predictor = CausalConvF0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)
        self._register_load_state_dict_pre_hook(_legacy_weight_norm_hook)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def lookahead(self) -> int:
        """Mel frames a non-final call holds back (F0 look-ahead + conv_pre look-ahead + the last
        frame, whose samples the iSTFT has not finished): 8 for the published model."""
        return self.f0_predictor.lookahead + self.cfg.conv_pre_look_right + 1

    def left_context(self) -> int:
        """Mel frames before a sample that its value can depend on, given the F0 and excitation of
        those frames (the decoder's receptive field, an upper bound rounded up): 29 for the published model."""
        cfg = self.cfg
        frame = math.prod(cfg.upsample_rates)  # STFT frames (and last-stage steps) per mel frame
        stft_reach = cfg.n_fft / 2 / (frame * cfg.hop_len)  # an STFT frame reaches n_fft/2 samples back
        n_res = len(cfg.resblock_kernel_sizes)
        reach, rate = 0.0, 1
        for i, u in enumerate(cfg.upsample_rates):
            rate *= u
            up = (self.ups[i].left + u - 1 + (1 if i == len(self.ups) - 1 else 0)) / rate  # + reflection pad
            down = self.source_downs[i]
            source = (self.source_resblocks[i].left_context / rate
                      + (down.left + down.stride[0] - 1) / frame + stft_reach)
            blocks = max(b.left_context for b in self.resblocks[i * n_res:(i + 1) * n_res]) / rate
            reach = blocks + max(reach + up, source)
        reach += self.conv_post.left / frame + stft_reach  # conv_post, then the iSTFT's overlap
        return math.ceil(reach)

    # -- pieces -------------------------------------------------------------------------------
    def f0(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """Mel [B, 80, T] -> F0 [B, T] in Hz (non-final: [B, T - 3])."""
        return self.f0_predictor(mel, finalize=finalize)

    def source(self, f0: torch.Tensor, noise: torch.Tensor,
               carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """F0 [B, T] -> (excitation [B, 1, T * 480], phase carry); see :class:`CausalHarmonicSource`."""
        samples = f0.shape[1] * self.cfg.samples_per_frame
        if noise.dim() != 3 or noise.shape[1] != samples or noise.shape[2] != self.m_source.harmonics:
            raise InvalidInputError(f"noise: got {list(noise.shape)}; the source of {f0.shape[1]} frames needs "
                                    f"[1, {samples}, {self.m_source.harmonics}]")
        return self.m_source(f0, noise.to(f0.device), carry)

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """Mel [B, 80, T] + excitation [B, 1, T * 480] -> waveform [B, T * 480]; non-final: the last
        ``conv_pre_look_right`` frames are look-ahead only and the last frame's samples are left out,
        [B, (T - look_right - 1) * 480]."""
        cfg, look = self.cfg, self.cfg.conv_pre_look_right
        s_stft = source_stft(source, cfg, self.stft_window)
        if finalize:
            x = self.conv_pre(F.pad(mel, (0, look)))
        else:
            x = self.conv_pre(mel)
            s_stft = s_stft[:, :, :s_stft.shape[2] - math.prod(cfg.upsample_rates) * look]
        for i, (u, up) in enumerate(zip(cfg.upsample_rates, self.ups)):
            x = up(F.leaky_relu(x, cfg.lrelu_slope).repeat_interleave(u, dim=2))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = fuse_stage(self, i, x, s_stft)
        wav = spectrum_to_wave(self.conv_post(F.leaky_relu(x)), cfg, self.stft_window)  # slope 0.01, as upstream
        if not finalize:
            wav = wav[:, :wav.shape[1] - cfg.samples_per_frame]
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def forward(self, mel: torch.Tensor, finalize: bool = True, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mel [B, 80, T] -> waveform: [B, T * 480], or non-final [B, (T - 8) * 480] (upstream's
        ``inference(mel, finalize)``). ``noise`` [1, S, H+1] (uniform, S = the source's samples:
        T * 480, non-final (T - 3) * 480) is taken from ``generator`` (see :class:`SourceNoise`;
        None: seeded 0) when not given."""
        cfg = self.cfg
        f0 = self.f0(mel, finalize)
        if noise is None:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            noise = SourceNoise(self.m_source.harmonics, gen).take(f0.shape[1] * cfg.samples_per_frame)
        source, _ = self.source(f0, noise)
        return self.decode(mel if finalize else mel[:, :, :f0.shape[1]], source, finalize)


def build(cfg: CausalHiFTConfig | None = None, device: torch.device | str | None = None) -> CausalHiFTGenerator:
    """Construct (on ``device``, e.g. ``"meta"`` for sizing) without loading weights."""
    with torch.device(device or "cpu"):
        return CausalHiFTGenerator(cfg)


def load(model_dir: str | Path, device: torch.device | str = "cpu") -> CausalHiFTGenerator:
    """HiFT of a CosyVoice3 folder: ``cosyvoice3.yaml`` numbers + ``hift.pt`` loaded strictly."""
    model_dir = Path(model_dir)
    model = build(CausalHiFTConfig.from_yaml(model_dir / V3_YAML))
    state = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
