"""CosyVoice3's streamed vocoding, per request: the HiFT half of upstream's ``CosyVoice3Model.token2wav``,
computed incrementally.

Upstream vocodes the WHOLE mel received so far at every chunk (``finalize=False`` until the last) and
releases only the samples past those it released before: after ``T`` frames a non-final chunk has
released ``480 * (T - 8)`` samples, the final one the rest. Because the causal vocoder's outputs never
depend on later frames (beyond its look-ahead), each release equals the same samples of one vocoding
of the finished mel, and re-vocoding the past is wasted: its cost grows with the square of the length.

This stream releases the same samples chunk for chunk, but computes each chunk over a bounded window:

- F0 only for the new frames, from the last 8 frames before them (the F0 convs' reach) onwards;
- the excitation only for the new frames, continuing the running phase (float64 carry) and the noise
  sequence (:class:`~.hift_causal.SourceNoise`) where they stopped;
- the decoder over the new frames plus :meth:`~.hift_causal.CausalHiFTGenerator.left_context` frames
  (29 for the published model) of mel and excitation before them, keeping only the new samples: the
  left-hand zero padding and reflections at the window's start cannot reach them.

So chunk ``k`` costs its own frames plus a constant, and the stream holds only those tails.
``speed != 1`` resamples the mel linearly and needs one single final push, as upstream.
"""

from __future__ import annotations

import torch

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice.hift_causal import CausalHiFTGenerator, SourceNoise
from edge_runtime.models.cosyvoice.hift_stream import stretch_mel


class CausalHiFTStream:
    """One request's vocoding state: ``push`` mel chunks, get the new audio back.

    ``generator``: a ``torch.Generator`` for the source noise (None: a fresh one seeded 0; see
    :func:`~.hift_causal.upstream_noise_generator` for upstream's own), or a :class:`SourceNoise`.
    """

    def __init__(self, hift: CausalHiFTGenerator, generator: torch.Generator | SourceNoise | None = None):
        self.hift = hift
        weight = hift.conv_pre.bias
        self._device, self._dtype = weight.device, weight.dtype
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if not isinstance(generator, SourceNoise):
            generator = SourceNoise(hift.m_source.harmonics, generator)
        self._noise = generator
        self.samples_per_frame = hift.cfg.samples_per_frame
        self.context = hift.left_context()
        self._frames = 0  # mel frames received
        self._f0_done = 0  # frames whose F0 and excitation are final
        self._emitted = 0  # frames whose samples were released
        self._mel: torch.Tensor | None = None  # [1, C, n]: frames mel_start .. frames - 1
        self._mel_start = 0
        self._source: torch.Tensor | None = None  # [1, 1, n * 480]: frames source_start .. f0_done - 1
        self._source_start = 0
        self._carry: torch.Tensor | None = None  # the phase (cycles, float64) after frame f0_done - 1
        self._started = False
        self._finished = False

    @property
    def nbytes(self) -> int:
        """Bytes held between pushes (0 before the first push and after finalize/close)."""
        return sum(t.numel() * t.element_size() for t in (self._mel, self._source, self._carry) if t is not None)

    def close(self) -> None:
        """Drop the state; the stream accepts no more pushes."""
        self._mel = self._source = self._carry = None
        self._finished = True

    def push(self, mel_new: torch.Tensor, finalize: bool = False, speed: float = 1.0) -> torch.Tensor:
        """Vocode the next mel chunk [1, 80, F] -> the audio [1, samples] now final.

        After ``T`` frames in all, a non-final push has released ``480 * max(T - 8, 0)`` samples in
        all, the final push everything (``480 * T``)."""
        if self._finished:
            raise RuntimeError("CausalHiFTStream: push after the final chunk or close()")
        mel = self._checked(mel_new)
        if speed != 1.0:
            if self._started or not finalize:
                raise InvalidInputError(f"speed: {speed} is offline only; vocode the whole mel in one final push "
                                        "(or use speed 1.0 when streaming)")
            mel = stretch_mel(mel, speed)
        self._started = True
        self._mel = mel if self._mel is None else torch.cat([self._mel, mel], dim=2)
        self._frames += mel.shape[2]
        if finalize and self._frames == 0:
            raise InvalidInputError("mel: the stream received no frames; the final chunk needs at least one")
        with torch.inference_mode():
            self._advance_source(finalize)
            wav = self._release(finalize)
        if finalize:
            self.close()
        else:
            self._trim()
        return wav

    # -- steps ------------------------------------------------------------------------------------
    def _checked(self, mel: torch.Tensor) -> torch.Tensor:
        channels = self.hift.cfg.in_channels
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != channels:
            shape = list(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise InvalidInputError(f"mel: got {shape}; a HiFT stream takes one mel chunk [1, {channels}, frames]")
        if not mel.is_floating_point():
            raise InvalidInputError(f"mel: dtype {mel.dtype} is not allowed; use a floating-point mel")
        return mel.to(self._device, self._dtype)

    def _mel_frames(self, start: int, end: int) -> torch.Tensor:
        return self._mel[:, :, start - self._mel_start:end - self._mel_start]

    def _advance_source(self, finalize: bool) -> None:
        """F0 and excitation of the frames that became final (all of them when finalizing; else all but
        the F0 look-ahead)."""
        predictor = self.hift.f0_predictor
        target = self._frames if finalize else self._frames - predictor.lookahead
        if target <= self._f0_done:
            return
        start = max(0, self._f0_done - predictor.left_context)
        f0 = self.hift.f0(self._mel_frames(start, self._frames), finalize=finalize)[:, self._f0_done - start:]
        noise = self._noise.take((target - self._f0_done) * self.samples_per_frame)
        source, self._carry = self.hift.source(f0, noise, self._carry)
        self._source = source if self._source is None else torch.cat([self._source, source], dim=2)
        self._f0_done = target

    def _release(self, finalize: bool) -> torch.Tensor:
        """Decode a window reaching ``context`` frames before the first new sample; keep the new ones."""
        hift, spf = self.hift, self.samples_per_frame
        end = self._frames if finalize else self._frames - hift.lookahead  # frames released after this push
        if end <= self._emitted:
            return torch.zeros(1, 0, device=self._device, dtype=self._dtype)
        start = max(0, self._emitted - self.context)
        last = self._f0_done  # == frames when finalizing; else frames - F0 look-ahead
        mel = self._mel_frames(start, last)
        source = self._source[:, :, (start - self._source_start) * spf:(last - self._source_start) * spf]
        wav = hift.decode(mel, source, finalize=finalize)[:, (self._emitted - start) * spf:]
        self._emitted = end
        return wav

    def _trim(self) -> None:
        """Drop what no later push reads: mel before the next F0 / decoder windows, excitation before
        the next decoder window."""
        decode_from = max(0, self._emitted - self.context)
        mel_from = min(decode_from, max(0, self._f0_done - self.hift.f0_predictor.left_context))
        if mel_from > self._mel_start:
            self._mel = self._mel[:, :, mel_from - self._mel_start:].clone()
            self._mel_start = mel_from
        if self._source is not None and decode_from > self._source_start:
            cut = (decode_from - self._source_start) * self.samples_per_frame
            self._source = self._source[:, :, cut:].clone()
            self._source_start = decode_from


def vocode(hift: CausalHiFTGenerator, mel: torch.Tensor, *, speed: float = 1.0,
           generator: torch.Generator | SourceNoise | None = None) -> torch.Tensor:
    """Offline vocoding as upstream's ``token2wav(..., finalize=True, speed=speed)``: mel [1, 80, T] -> audio."""
    return CausalHiFTStream(hift, generator).push(mel, finalize=True, speed=speed)
