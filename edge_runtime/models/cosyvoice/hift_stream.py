"""CosyVoice2's chunked vocoding: the HiFT half of upstream's ``CosyVoice2Model.token2wav``, per request.

Upstream vocodes each streamed chunk of flow mel on its own and hides the seams three ways:

- the last 8 mel frames of a chunk are held back and vocoded again in front of the next chunk, so the
  convolutions there see real context on both sides;
- the excitation over those 8 frames is replaced by the one the previous chunk made for them, so the
  harmonic source does not restart there;
- the last 8 x 480 samples of a chunk are not released: they are cross-faded into the start of the
  next chunk's audio with a Hamming window (in float64, as upstream's numpy window makes it).

``finalize`` releases everything left. ``speed != 1`` resamples the mel linearly, offline only (a
stream's first and final push), as upstream.

Randomness: each chunk draws initial phases and noise for its whole excitation, cached frames
included. From the stream's ``torch.Generator`` they follow the sequence upstream's global RNG gives
after one ``torch.manual_seed`` at the start of the stream; the global RNG is never touched.

Recomputation kept on purpose: the F0 predictor and the decoder run over the 8 cached frames again,
as upstream does. Equality needs both. The cached frames' F0 changes once their right-hand context
exists (the F0 convolutions see 5 frames each way), and through the per-frame phase sum it sets the
phase of every later sample; the decoder's output over those frames is the cross-faded part that is
released.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice.hift import HiFTGenerator

MEL_CACHE_FRAMES = 8  # upstream CosyVoice2Model.mel_cache_len; the source/speech caches are this x 480

SourceDraw = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""``(batch, samples) -> (phase [batch, H+1], noise [batch, samples, H+1])``: see ``HiFTGenerator.source``."""


@functools.lru_cache(maxsize=8)
def _crossfade_window(samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fade-in, fade-out) halves of a symmetric Hamming window of 2 x samples, float64."""
    window = torch.hamming_window(2 * samples, periodic=False, dtype=torch.float64, device=device)
    return window[:samples], window[samples:]


def stretch_mel(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """Upstream's speed change: the mel [B, C, T] linearly resampled to int(T / speed) frames."""
    if not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0):
        raise InvalidInputError(f"speed: {speed!r} is not allowed; use a finite number > 0 (1.0 = unchanged)")
    frames = int(mel.shape[2] / speed)
    if frames < 1:
        raise InvalidInputError(f"speed: {speed} leaves no audio from {mel.shape[2]} mel frames; use a smaller speed")
    return F.interpolate(mel, size=frames, mode="linear")


class HiFTStream:
    """One request's vocoding state: ``push`` mel chunks, get seamless audio back.

    ``generator`` is a ``torch.Generator`` (None: a fresh one seeded 0) or a :data:`SourceDraw` that
    supplies each chunk's phases and noise. The stream holds only its caches (``nbytes``).
    """

    def __init__(self, hift: HiFTGenerator, generator: torch.Generator | SourceDraw | None = None):
        self.hift = hift
        weight = next(hift.parameters())
        self._device, self._dtype = weight.device, weight.dtype
        if generator is None:
            generator = torch.Generator(device=self._device).manual_seed(0)
        if isinstance(generator, torch.Generator):
            gen = generator  # drawn on its own device (a CPU generator gives CPU-identical noise on any device)
            self._draw: SourceDraw = lambda batch, samples: hift.m_source.draw(batch, samples, gen, gen.device)
        else:
            self._draw = generator
        self.cache_samples = MEL_CACHE_FRAMES * hift.cfg.samples_per_frame
        self._mel: torch.Tensor | None = None  # [1, C, 8] frames to vocode again in front of the next chunk
        self._source: torch.Tensor | None = None  # [1, 1, cache_samples] their excitation
        self._speech: torch.Tensor | None = None  # [1, cache_samples] audio held back for the cross-fade
        self._started = False
        self._finished = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the caches (0 before the first push and after finalize/close)."""
        return sum(t.numel() * t.element_size() for t in (self._mel, self._source, self._speech) if t is not None)

    def close(self) -> None:
        """Drop the caches; the stream accepts no more pushes."""
        self._mel = self._source = self._speech = None
        self._finished = True

    def push(self, mel_new: torch.Tensor, finalize: bool = False, speed: float = 1.0) -> torch.Tensor:
        """Vocode the next mel chunk [1, 80, F] -> audio [1, samples] ready to play.

        A non-final push returns (cached + F - 8) x 480 samples, holding the last 8 x 480 back; the
        final push returns all that is left. ``speed`` other than 1 needs a single, final push."""
        if self._finished:
            raise RuntimeError("HiFTStream: push after the final chunk or close()")
        mel = self._checked(mel_new)
        if speed != 1.0:
            if self._started or not finalize:
                raise InvalidInputError(f"speed: {speed} is offline only; vocode the whole mel in one final push "
                                        "(or use speed 1.0 when streaming)")
            mel = stretch_mel(mel, speed)
        self._started = True
        if self._mel is not None:
            mel = torch.cat([self._mel, mel], dim=2)
        if mel.shape[2] < (1 if finalize else MEL_CACHE_FRAMES):
            raise InvalidInputError(f"mel: {mel.shape[2]} frames (cached included) are too few for a "
                                    f"{'final' if finalize else 'non-final'} chunk; need at least "
                                    f"{1 if finalize else MEL_CACHE_FRAMES}")
        with torch.inference_mode():
            wav, source = self._vocode(mel)
        if finalize:
            self.close()
            return wav
        n = self.cache_samples
        # Copies, so that the caches do not keep the whole chunk's tensors alive.
        self._mel = mel[:, :, -MEL_CACHE_FRAMES:].clone()
        self._source = source[:, :, -n:].clone()
        self._speech = wav[:, -n:].clone()
        return wav[:, :-n]

    def _checked(self, mel: torch.Tensor) -> torch.Tensor:
        channels = self.hift.cfg.in_channels
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != channels:
            shape = list(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise InvalidInputError(f"mel: got {shape}; a HiFT stream takes one mel chunk [1, {channels}, frames]")
        if not mel.is_floating_point():
            raise InvalidInputError(f"mel: dtype {mel.dtype} is not allowed; use a floating-point mel")
        return mel.to(self._device, self._dtype)

    def _vocode(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel [1, C, T] (cached frames first) -> (audio [1, T x 480] cross-faded, excitation [1, 1, T x 480])."""
        phase, noise = self._draw(1, mel.shape[2] * self.hift.cfg.samples_per_frame)
        source = self.hift.source(mel, phase=phase, noise=noise)
        n = self.cache_samples
        if self._source is not None:
            source[:, :, :n] = self._source
        wav = self.hift.decode(mel, source)
        if self._speech is not None:
            fade_in, fade_out = _crossfade_window(n, wav.device)
            wav[:, :n] = (wav[:, :n].double() * fade_in + self._speech.double() * fade_out).to(wav.dtype)
        return wav, source


def vocode(hift: HiFTGenerator, mel: torch.Tensor, *, speed: float = 1.0,
           generator: torch.Generator | SourceDraw | None = None) -> torch.Tensor:
    """Offline vocoding as upstream's ``token2wav(..., finalize=True, speed=speed)``: mel [1, 80, T] -> audio."""
    return HiFTStream(hift, generator).push(mel, finalize=True, speed=speed)
