"""Compressed audio encoded while it is produced (PyAV, which bundles FFmpeg's encoders and muxers).

`StreamEncoder(fmt, rate)` takes float chunks as they come (`feed`) and returns the container bytes
the muxer has written so far, so an HTTP response can send mp3, opus or aac frame by frame instead
of waiting for the whole utterance. Every format uses a container that needs no seek back at the
end (the output is a pipe, never seekable):

    mp3   MPEG-1 layer III frames (libmp3lame), no Xing/ID3 rewrite        audio/mpeg
    opus  Ogg pages of Opus packets (libopus; 24 kHz for 22.05 kHz input)    audio/ogg; codecs=opus
    aac   ADTS frames of AAC-LC (FFmpeg's aac encoder), what OpenAI sends     audio/aac

PyAV re-chunks to the encoder's frame size and resamples (opus) with its own state, so chunk
boundaries leave no seams. `flush_packets` hands every muxed packet to us at once, and Ogg pages are
closed every 20 ms of audio (default: 1 s) so the first page leaves with the first sentence.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any

import numpy as np

STREAM_CODECS = {  # format -> (muxer, encoder, encoder options)
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {}),
    "aac": ("adts", "aac", {}),
}
BIT_RATES = {"mp3": 64000, "opus": 32000, "aac": 64000}  # mono speech: plenty, and small
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _require_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - the server extra installs it
        from edge_runtime.runtime.audio import AudioFormatError

        raise AudioFormatError("mp3/opus/aac streaming and aac need PyAV: pip install 'edge_runtime[server]' "
                               "(or pip install av)") from exc
    return av


class _Sink:
    """What the muxer writes into: bytes collected until taken (no seek: a pipe to FFmpeg)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class StreamEncoder:
    """Float mono chunks in, container bytes out as soon as the muxer writes them; `close()`
    flushes the encoder and returns the rest. One request's stream; calls are serialised by a lock,
    so `abort()` (a client gone while a chunk is encoding in a worker thread) waits for that chunk
    instead of closing the container under it."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        av = _require_av()
        if fmt not in STREAM_CODECS:
            raise ValueError(f"no streaming encoder for {fmt!r}; allowed: {', '.join(STREAM_CODECS)}")
        muxer, codec, options = STREAM_CODECS[fmt]
        self.fmt = fmt
        self.input_rate = sample_rate
        rate = sample_rate
        if fmt == "opus" and sample_rate not in OPUS_RATES:
            rate = next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])
        self.rate = rate
        self._sink = _Sink()
        container_options = {"flush_packets": "1"}
        if muxer == "ogg":
            container_options["page_duration"] = "20000"  # microseconds
        if muxer == "mp3":
            container_options["write_xing"] = "0"  # its frame count needs a seek back at the end
        self._out = av.open(self._sink, mode="w", format=muxer, options=container_options)
        self._stream = self._out.add_stream(codec, rate=rate, options=dict(options))
        self._stream.codec_context.layout = "mono"
        self._stream.codec_context.bit_rate = BIT_RATES[fmt]
        self._av = av
        self._pts = 0
        self._closed = False
        self._lock = threading.Lock()

    def feed(self, audio: np.ndarray) -> bytes:
        """Encode one chunk; the bytes the muxer has written since the last call (maybe none yet)."""
        samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
        with self._lock:
            if self._closed:
                return b""
            return self._feed(samples)

    def _feed(self, samples: np.ndarray) -> bytes:
        if samples.size:
            frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.input_rate
            frame.pts = self._pts
            frame.time_base = Fraction(1, self.input_rate)
            self._pts += samples.size
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        """Flush the encoder, write the trailer; the last bytes."""
        with self._lock:
            if self._closed:
                return b""
            self._closed = True
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()
            return self._sink.take()

    def abort(self) -> None:
        """Drop the stream (the client left or synthesis failed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._out.close()
            except Exception:  # noqa: BLE001 - a half-written container: nothing to save
                pass


def encode_whole(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A complete file through the same encoder (aac for files; mp3/opus when streamed)."""
    encoder = StreamEncoder(fmt, sample_rate)
    return encoder.feed(audio) + encoder.close()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container PyAV reads -> float32 mono samples and rate (tests and checks)."""
    import io

    av = _require_av()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        pieces = []
        for frame in container.decode(stream):
            data = frame.to_ndarray()
            if data.dtype.kind == "i":
                data = data / float(np.iinfo(data.dtype).max + 1)
            pieces.append(data.astype(np.float32).reshape(-1))
        rate = stream.codec_context.sample_rate
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), rate
