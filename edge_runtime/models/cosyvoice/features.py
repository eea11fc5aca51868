"""The three spectral features CosyVoice2's front ends read from a voice prompt.

    whisper_log_mel  16 kHz -> [128, frames] log-mel, 100 frames/s: the speech tokenizer's input
                     (what ``whisper.log_mel_spectrogram(audio, n_mels=128)`` computes)
    speaker_fbank    16 kHz -> [frames, 80] Kaldi fbank (dither 0), mean-subtracted over time: the
                     CAM++ speaker-embedding input (``torchaudio.compliance.kaldi.fbank`` defaults)
    prompt_mel       24 kHz -> [frames, 80] natural-log mel, 50 frames/s: the flow's prompt
                     features (Matcha-TTS's mel, numbers from the yaml's ``feat_extractor``)

The Slaney filter banks come from ``transformers.audio_utils.mel_filter_bank`` (equal to librosa's),
Kaldi's is built as Kaldi builds it; each is made once per set of numbers. The transforms are
vectorised torch (no per-frame Python). All outputs are float32 on the CPU. Inputs are mono float
arrays or tensors in [-1, 1] (no 16-bit scaling anywhere, as upstream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

# whisper's front end (whisper/audio.py): 25 ms Hann window, 10 ms hop at 16 kHz
WHISPER_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_MELS = 128

# Kaldi fbank as torchaudio.compliance.kaldi.fbank runs it with upstream's arguments
KALDI_RATE = 16000
KALDI_WINDOW = 400  # 25 ms
KALDI_SHIFT = 160  # 10 ms
KALDI_FFT = 512  # window rounded up to a power of two
KALDI_MELS = 80
KALDI_LOW_HZ = 20.0
KALDI_PREEMPHASIS = 0.97
KALDI_POVEY_POWER = 0.85  # Povey window = Hann ** 0.85
KALDI_LOG_FLOOR = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class PromptMelConfig:
    """The ``feat_extractor`` section of ``cosyvoice2.yaml`` (defaults: CosyVoice2-0.5B)."""

    n_fft: int = 1920
    num_mels: int = 80
    sampling_rate: int = 24000
    hop_size: int = 480
    win_size: int = 1920
    fmin: float = 0.0
    fmax: float | None = 8000.0  # None: up to Nyquist (CosyVoice3's yaml)
    center: bool = False

    @classmethod
    def from_yaml(cls, cfg: dict, default_fmax: float | None = 8000.0) -> PromptMelConfig:
        """From a whole (tag-free) yaml mapping: its ``feat_extractor`` section, where present
        (``default_fmax`` where it is not: 8000 for CosyVoice2, None for CosyVoice3)."""
        section = cfg.get("feat_extractor") or {}
        d = cls()
        sr = section.get("sampling_rate", cfg.get("sample_rate", d.sampling_rate))
        fmax = section.get("fmax", default_fmax)
        return cls(
            n_fft=int(section.get("n_fft", d.n_fft)),
            num_mels=int(section.get("num_mels", d.num_mels)),
            sampling_rate=int(sr),
            hop_size=int(section.get("hop_size", d.hop_size)),
            win_size=int(section.get("win_size", d.win_size)),
            fmin=float(section.get("fmin", d.fmin)),
            fmax=None if fmax is None else float(fmax),
            center=bool(section.get("center", d.center)),
        )

    @property
    def edge_pad(self) -> int:
        # Matcha pads (n_fft - hop) / 2 on each side so that frames = samples / hop
        return (self.n_fft - self.hop_size) // 2


@lru_cache(maxsize=8)
def _slaney_filters(n_fft: int, n_mels: int, rate: int, fmin: float, fmax: float) -> torch.Tensor:
    """[n_mels, n_fft/2+1] Slaney-scale, Slaney-normalised filters (librosa's ``filters.mel``)."""
    bank = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=fmin,
                           max_frequency=fmax, sampling_rate=rate, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank.T.astype(np.float32)).contiguous()


@lru_cache(maxsize=1)
def _kaldi_filters() -> torch.Tensor:
    """[80, 257] Kaldi mel bins: triangles in mel space (1127 ln(1 + f/700)) from 20 Hz to Nyquist,
    the Nyquist bin unweighted.

    Built in single precision in Kaldi's order of operations (as torchaudio does), not with
    transformers' float64 bank: the two differ by 1.4e-5 per weight, which moves the log fbank of a
    pure tone by 1.3e-4; this way it matches torchaudio's bit for bit.
    """
    def mel(hz):
        return 1127.0 * math.log(1.0 + hz / 700.0)

    low, high = mel(KALDI_LOW_HZ), mel(KALDI_RATE / 2)
    step = (high - low) / (KALDI_MELS + 1)
    edges = low + torch.arange(KALDI_MELS + 2, dtype=torch.float32)[:, None] * step  # [82, 1]
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    bin_hz = (KALDI_RATE / KALDI_FFT) * torch.arange(KALDI_FFT // 2, dtype=torch.float32)
    bin_mel = 1127.0 * (1.0 + bin_hz / 700.0).log()
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    bank = rising.minimum(falling).clamp_min(0.0)
    return torch.nn.functional.pad(bank, (0, 1))  # + the Nyquist bin


@lru_cache(maxsize=8)
def _hann(length: int, periodic: bool = True) -> torch.Tensor:
    return torch.hann_window(length, periodic=periodic, dtype=torch.float32)


@lru_cache(maxsize=1)
def _povey() -> torch.Tensor:
    return _hann(KALDI_WINDOW, periodic=False).pow(KALDI_POVEY_POWER)


def _mono(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(audio, dtype=torch.float32)
    if x.dim() != 1:
        raise ValueError(f"expected mono audio of shape [samples], got {tuple(x.shape)}")
    return x


def whisper_log_mel(audio_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[128, samples // 160] whisper log-mel of 16 kHz audio (the speech tokenizer's ``feats``)."""
    x = _mono(audio_16k)
    spec = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=_hann(WHISPER_N_FFT), center=True,
                      pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs().square()  # whisper drops the last frame; |X| then squared, as whisper
    mel = _slaney_filters(WHISPER_N_FFT, WHISPER_MELS, WHISPER_RATE, 0.0, WHISPER_RATE / 2) @ power
    log = mel.clamp_min(1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)  # 80 dB dynamic range below the clip's peak
    return (log + 4.0) / 4.0


def speaker_fbank(audio_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[frames, 80] Kaldi log-mel fbank of 16 kHz audio, each bin's mean over time subtracted."""
    x = _mono(audio_16k)
    if x.numel() < KALDI_WINDOW:
        return torch.zeros(0, KALDI_MELS)
    # snip-edges framing: 1 + (samples - 400) // 160 whole windows, no padding
    frames = x.unfold(0, KALDI_WINDOW, KALDI_SHIFT)  # [frames, 400], a view
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove each frame's DC offset
    # pre-emphasis; the first sample is paired with itself (Kaldi's replicate padding)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - KALDI_PREEMPHASIS * previous) * _povey()
    power = torch.fft.rfft(frames, n=KALDI_FFT).abs().pow(2)
    fbank = (power @ _kaldi_filters().T).clamp_min(KALDI_LOG_FLOOR).log()
    return fbank - fbank.mean(dim=0, keepdim=True)


def prompt_mel(audio: np.ndarray | torch.Tensor, cfg: PromptMelConfig = PromptMelConfig()) -> torch.Tensor:
    """[frames, num_mels] natural-log mel of audio at ``cfg.sampling_rate`` (the flow's prompt)."""
    x = _mono(audio)
    pad = cfg.edge_pad
    if x.numel() <= pad:  # reflect padding needs more samples than it pads
        return torch.zeros(0, cfg.num_mels)
    x = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, cfg.n_fft, cfg.hop_size, win_length=cfg.win_size, window=_hann(cfg.win_size),
                      center=cfg.center, pad_mode="reflect", return_complex=True)
    magnitude = (spec.real.square() + spec.imag.square() + 1e-9).sqrt()
    fmax = cfg.sampling_rate / 2 if cfg.fmax is None else cfg.fmax
    mel = _slaney_filters(cfg.n_fft, cfg.num_mels, cfg.sampling_rate, cfg.fmin, fmax) @ magnitude
    return mel.clamp_min(1e-5).log().T.contiguous()
