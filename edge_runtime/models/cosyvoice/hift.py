"""CosyVoice2's HiFT vocoder (mel -> 24 kHz waveform), written for edge_runtime.

HiFT = a neural-source-filter front (an F0 predictor drives a sum of 8 harmonics plus noise) feeding a
HiFi-GAN style upsampler whose last layer predicts a 16-point STFT (magnitude + phase) that an iSTFT
(hop 4) turns into samples: 8 x 5 x 3 x 4 = 480 samples per mel frame.

The module's parameter names and shapes follow upstream's ``HiFTGenerator`` so that ``hift.pt`` loads
with ``strict=True`` (weight norm as ``parametrizations.weight.original0/1``; the older
``weight_g``/``weight_v`` names are renamed on load).

Randomness is explicit: the source's initial harmonic phases and its Gaussian noise are either passed
in (``phase``, ``noise``) or drawn from a per-call ``torch.Generator`` (seed 0 when none is given);
the global RNG is never touched. Drawn from a generator seeded ``s`` they equal what upstream draws
after ``torch.manual_seed(s)`` on the CPU.

``forward(mel)`` vocodes a whole mel; upstream's chunked vocoding (8-frame mel cache, source cache,
Hamming cross-fade) and its ``speed`` resampling are :mod:`.hift_stream`, built on ``source``/``decode``.
CosyVoice3's causal vocoder (:mod:`.hift_causal`) reuses the blocks here (``causal`` residual stacks,
the source's parameters, the STFT/iSTFT ends of ``decode``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from edge_runtime.models.cosyvoice import yaml_config


@dataclass(frozen=True)
class HiFTConfig:
    """The numbers of the ``hift:`` section of ``cosyvoice2.yaml`` (defaults: CosyVoice2-0.5B)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.hop_len

    @classmethod
    def from_section(cls, hift: dict, sample_rate: int | None = None) -> HiFTConfig:
        """Build from the (tag-free) ``hift`` mapping of the yaml."""
        istft = hift.get("istft_params") or {}
        f0 = hift.get("f0_predictor") or {}
        d = cls()
        sr = hift.get("sampling_rate", sample_rate if sample_rate is not None else d.sampling_rate)

        def tup(key, default):
            v = hift.get(key)
            return default if v is None else tuple(int(x) for x in v)

        def tup2(key, default):
            v = hift.get(key)
            return default if v is None else tuple(tuple(int(x) for x in row) for row in v)

        return cls(
            in_channels=int(hift.get("in_channels", d.in_channels)),
            base_channels=int(hift.get("base_channels", d.base_channels)),
            nb_harmonics=int(hift.get("nb_harmonics", d.nb_harmonics)),
            sampling_rate=int(sr),
            nsf_alpha=float(hift.get("nsf_alpha", d.nsf_alpha)),
            nsf_sigma=float(hift.get("nsf_sigma", d.nsf_sigma)),
            nsf_voiced_threshold=float(hift.get("nsf_voiced_threshold", d.nsf_voiced_threshold)),
            upsample_rates=tup("upsample_rates", d.upsample_rates),
            upsample_kernel_sizes=tup("upsample_kernel_sizes", d.upsample_kernel_sizes),
            n_fft=int(istft.get("n_fft", d.n_fft)),
            hop_len=int(istft.get("hop_len", d.hop_len)),
            resblock_kernel_sizes=tup("resblock_kernel_sizes", d.resblock_kernel_sizes),
            resblock_dilation_sizes=tup2("resblock_dilation_sizes", d.resblock_dilation_sizes),
            source_resblock_kernel_sizes=tup("source_resblock_kernel_sizes", d.source_resblock_kernel_sizes),
            source_resblock_dilation_sizes=tup2("source_resblock_dilation_sizes", d.source_resblock_dilation_sizes),
            lrelu_slope=float(hift.get("lrelu_slope", d.lrelu_slope)),
            audio_limit=float(hift.get("audio_limit", d.audio_limit)),
            f0_num_class=int(f0.get("num_class", d.f0_num_class)),
            f0_in_channels=int(f0.get("in_channels", d.f0_in_channels)),
            f0_cond_channels=int(f0.get("cond_channels", d.f0_cond_channels)),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> HiFTConfig:
        """Read ``cosyvoice2.yaml`` (tags ignored) and build from its ``hift`` section."""
        cfg = yaml_config.load(path)
        if "hift" not in cfg:
            raise KeyError(f"{path}: no 'hift' section")
        sr = cfg.get("sample_rate")
        return cls.from_section(cfg["hift"], None if sr is None else int(sr))


def _same_padding(kernel: int, dilation: int = 1) -> int:
    return (kernel - 1) * dilation // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one alpha per channel (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class LeftPaddedConv1d(nn.Conv1d):
    """A causal Conv1d: ``left`` zeros are padded before the input (no padding after), so an output
    sees only the current and past inputs. Same parameters as a plain Conv1d."""

    def __init__(self, *args, left: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.left = left

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(F.pad(x, (self.left, 0)))


class SnakeResBlock(nn.Module):
    """Residual stack: per dilation, Snake -> dilated conv -> Snake -> conv, added to the input.

    ``causal`` (CosyVoice3's vocoder): each conv sees only the current and past samples (zeros
    padded on the left instead of half on each side); the parameters are the same."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], causal: bool = False):
        super().__init__()

        def conv(d: int) -> nn.Module:
            if causal:
                return weight_norm(LeftPaddedConv1d(channels, channels, kernel, dilation=d, left=(kernel - 1) * d))
            return weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d)))

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x

    @property
    def left_context(self) -> int:
        """Past samples an output of a causal block depends on (its convs' reach, added up)."""
        return sum(c.left for c in (*self.convs1, *self.convs2)) if self.causal else 0


class ConvRNNF0Predictor(nn.Module):
    """Mel [B, C, T] -> F0 in Hz [B, T]: five conv3+ELU layers and a linear head (absolute value)."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """NSF source: F0 per sample -> harmonics 1..H+1 (+ noise) merged by Linear + tanh.

    The phase is accumulated at frame rate (linear down- then up-sampling by ``upsample``), as
    upstream's 24 kHz source does, so a chunk's phase depends only on its frames.
    """

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.harmonics = cfg.nb_harmonics + 1
        self.sampling_rate = cfg.sampling_rate
        self.upsample = cfg.samples_per_frame
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def draw(self, batch: int, samples: int, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(phase [B, H+1] uniform in [0, 1), noise [B, samples, H+1] standard normal), in the order
        and memory layout upstream draws them: its noise tensor is channel-major (a transposed view),
        and torch fills a non-contiguous tensor with a different sampler than a contiguous one, so the
        draw goes into the same strided view (on CPU this equals upstream's values exactly).

        Upstream's source module then draws a [B, samples, 1] noise branch that inference discards;
        it is drawn here too, so that successive calls (a stream's chunks) stay in step with what
        upstream's global RNG yields after one seed."""
        phase = torch.rand(batch, self.harmonics, generator=generator, device=device)
        noise = torch.empty(batch, self.harmonics, samples, device=device).transpose(1, 2)
        noise.normal_(generator=generator)
        torch.empty(batch, samples, 1, device=device).normal_(generator=generator)
        return phase, noise

    def forward(self, f0: torch.Tensor, phase: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [B, S, 1] Hz per sample, phase [B, H+1] in cycles, noise [B, S, H+1] -> source [B, S, 1]."""
        mult = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype)
        freq = f0 * mult  # [B, S, H+1]
        cycles = (freq / self.sampling_rate) % 1
        start = phase.to(cycles.dtype).clone()
        start[:, 0] = 0  # the fundamental starts at phase 0
        cycles = torch.cat([cycles[:, :1] + start[:, None], cycles[:, 1:]], dim=1)
        per_frame = F.interpolate(cycles.transpose(1, 2), scale_factor=1 / self.upsample, mode="linear")
        angle = torch.cumsum(per_frame, dim=2) * 2 * math.pi
        angle = F.interpolate(angle * self.upsample, scale_factor=self.upsample, mode="linear").transpose(1, 2)
        sines = torch.sin(angle) * self.sine_amp
        voiced = (f0 > self.voiced_threshold).to(sines.dtype)
        amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        excitation = sines * voiced + amp * noise.to(sines.dtype)
        return torch.tanh(self.l_linear(excitation))


def source_stft(source: torch.Tensor, cfg: HiFTConfig, window: torch.Tensor) -> torch.Tensor:
    """Excitation [B, 1, S] -> its STFT as [B, n_fft + 2, S / hop + 1] (real parts, then imaginary)."""
    window = window.to(device=source.device, dtype=source.dtype)
    spec = torch.stft(source.squeeze(1), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=window, return_complex=True)
    spec = torch.view_as_real(spec)
    return torch.cat([spec[..., 0], spec[..., 1]], dim=1)


def fuse_stage(model: nn.Module, i: int, x: torch.Tensor, s_stft: torch.Tensor) -> torch.Tensor:
    """Upsampling stage ``i`` after its transposed/upsampling conv: add the source branch brought to
    this rate, then the mean of the stage's residual stacks."""
    n_res = len(model.cfg.resblock_kernel_sizes)
    x = x + model.source_resblocks[i](model.source_downs[i](s_stft))
    acc = model.resblocks[i * n_res](x)
    for j in range(1, n_res):
        acc = acc + model.resblocks[i * n_res + j](x)
    return acc / n_res


def spectrum_to_wave(x: torch.Tensor, cfg: HiFTConfig, window: torch.Tensor) -> torch.Tensor:
    """conv_post's output [B, n_fft + 2, F] (log-magnitudes, then phases) -> iSTFT samples [B, (F - 1) * hop]."""
    window = window.to(device=x.device, dtype=x.dtype)
    half = cfg.n_fft // 2 + 1
    magnitude = torch.exp(x[:, :half]).clamp(max=1e2)
    phase = torch.sin(x[:, half:])  # sin of a phase: upstream's, kept for parity
    spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
    return torch.istft(spec, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=window)


def _legacy_weight_norm_hook(state_dict, prefix, *args, **kwargs) -> None:
    """Rename old-style ``*.weight_g`` / ``*.weight_v`` to the parametrization names."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in ((".weight_g", ".parametrizations.weight.original0"),
                         (".weight_v", ".parametrizations.weight.original1")):
            if key.endswith(old):
                state_dict[key[: -len(old)] + new] = state_dict.pop(key)


class HiFTGenerator(nn.Module):
    """CosyVoice2 vocoder: ``forward(mel [B, 80, T]) -> waveform [B, T * 480]`` at 24 kHz."""

    def __init__(self, cfg: HiFTConfig | None = None):
        super().__init__()
        cfg = cfg or HiFTConfig()
        if cfg.sampling_rate == 22050:
            raise NotImplementedError("CosyVoice1's 22.05 kHz source (SineGen v1) is not implemented")
        self.cfg = cfg
        c0, n_fft = cfg.base_channels, cfg.n_fft
        self.m_source = HarmonicSource(cfg)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, c0, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(c0 >> i, c0 >> (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # The source's STFT (n_fft + 2 channels at 1/hop of the sample rate) is brought down to each
        # upsampling stage's rate: strides are the cumulative upsampling rates still to come.
        rates = cfg.upsample_rates
        strides = [math.prod(rates[i + 1:]) for i in range(len(rates))]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (s, k, d) in enumerate(zip(strides, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            ch = c0 >> (i + 1)
            down = nn.Conv1d(n_fft + 2, ch, 1) if s == 1 else nn.Conv1d(n_fft + 2, ch, 2 * s, s, padding=s // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(SnakeResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            SnakeResBlock(c0 >> (i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(c0 >> len(rates), n_fft + 2, 7, padding=3))
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()
        self.register_buffer("stft_window", window, persistent=False)
        self._register_load_state_dict_pre_hook(_legacy_weight_norm_hook)

    # -- pieces -------------------------------------------------------------------------------
    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel [B, 80, T] -> F0 [B, T] in Hz."""
        return self.f0_predictor(mel)

    def source(self, mel: torch.Tensor, *, generator: torch.Generator | None = None,
               phase: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mel [B, 80, T] -> NSF excitation [B, 1, T * samples_per_frame].

        ``phase`` [B, H+1] (cycles, uniform in [0, 1); column 0 is ignored) and ``noise``
        [B, S, H+1] (standard normal) are drawn from ``generator`` when not given."""
        f0 = self.f0(mel)
        up = self.cfg.samples_per_frame
        f0_samples = f0.repeat_interleave(up, dim=1)[:, :, None]  # nearest upsampling, [B, S, 1]
        b, s = f0_samples.shape[:2]
        if phase is None or noise is None:
            gen = generator if generator is not None else torch.Generator(device=mel.device).manual_seed(0)
            drawn_phase, drawn_noise = self.m_source.draw(b, s, gen, device=mel.device)
            phase = drawn_phase if phase is None else phase
            noise = drawn_noise if noise is None else noise
        if tuple(noise.shape) != (b, s, self.m_source.harmonics):
            raise ValueError(f"noise must be {[b, s, self.m_source.harmonics]}, got {list(noise.shape)}")
        return self.m_source(f0_samples, phase.to(mel.device), noise.to(mel.device)).transpose(1, 2)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Mel [B, 80, T] + excitation [B, 1, S] -> waveform [B, S]."""
        cfg = self.cfg
        s_stft = source_stft(source, cfg, self.stft_window)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = fuse_stage(self, i, x, s_stft)
        wav = spectrum_to_wave(self.conv_post(F.leaky_relu(x)), cfg, self.stft_window)  # slope 0.01 here, as upstream
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    def forward(self, mel: torch.Tensor, *, generator: torch.Generator | None = None,
                phase: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mel [B, 80, T] -> waveform [B, T * 480] (offline; see :meth:`source` for the randomness)."""
        return self.decode(mel, self.source(mel, generator=generator, phase=phase, noise=noise))


def build(cfg: HiFTConfig | None = None, device: torch.device | str | None = None) -> HiFTGenerator:
    """Construct (on ``device``, e.g. ``"meta"`` for sizing) without loading weights."""
    with torch.device(device or "cpu"):
        return HiFTGenerator(cfg)


def load(model_dir: str | Path, device: torch.device | str = "cpu") -> HiFTGenerator:
    """HiFT of a CosyVoice2 folder: ``cosyvoice2.yaml`` numbers + ``hift.pt`` loaded strictly."""
    model_dir = Path(model_dir)
    model = build(HiFTConfig.from_yaml(model_dir / "cosyvoice2.yaml"))
    state = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
