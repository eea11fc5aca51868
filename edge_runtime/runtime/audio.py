"""Audio encoding to files and byte streams (soundfile/libsndfile does the codecs; aac, and mp3/opus
encoded while streaming, go through PyAV: see audio_stream.py)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

from edge_runtime.errors import InvalidInputError

# format name -> (libsndfile container, subtype)
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
    "aac": ("ADTS", "AAC"),  # not libsndfile's: PyAV encodes it (audio_stream.py)
}


# what an HTTP response says it carries (pcm: raw 16-bit little-endian mono, no header)
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg",
               "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "pcm": "audio/pcm"}
# Opus only encodes these rates; other rates are resampled up to the next one
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class AudioFormatError(InvalidInputError):
    """Unknown or unusable output format."""


def format_from_path(path: str | Path, default: str = "wav") -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else default


def check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS and fmt != "pcm":
        raise AudioFormatError(f"unknown audio format {fmt!r}; allowed: {', '.join([*FORMATS, 'pcm'])}")
    return fmt


def to_pcm16(audio: np.ndarray) -> bytes:
    """Little-endian signed 16-bit PCM, clipped (the raw `pcm` response format)."""
    clipped = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


OPEN_LENGTH = 0xFFFFFFFF
WAV_HEADER_BYTES = 44


def wav_stream_header(sample_rate: int, channels: int = 1, samples: int | None = None) -> bytes:
    """A 16-bit PCM WAV header for a stream. `samples` (per channel) known in advance: the true RIFF
    and data sizes, so strict readers (Python's `wave`) get the right duration. Unknown (None): both
    sizes say 0xFFFFFFFF ("until the end"), the convention OpenAI uses; browsers, ffmpeg and
    libsndfile read such a file to the end of the data."""
    block = channels * 2
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
    if samples is None or samples * block > OPEN_LENGTH - WAV_HEADER_BYTES:
        riff, data = OPEN_LENGTH, OPEN_LENGTH
    else:
        data = samples * block
        riff = WAV_HEADER_BYTES - 8 + data
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + fmt_chunk + b"data" + struct.pack("<I", data)


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Encode float audio in [-1, 1] into `fmt` bytes."""
    fmt = check_format(fmt)
    if fmt == "pcm":
        return to_pcm16(audio)
    container, subtype = FORMATS[fmt]
    if fmt == "aac":
        from edge_runtime.runtime.audio_stream import encode_whole

        return encode_whole(audio, sample_rate, fmt)
    if subtype == "OPUS" and sample_rate not in OPUS_RATES:
        from edge_runtime.dsp import resample

        target = next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])
        audio, sample_rate = resample(np.asarray(audio, dtype=np.float32), sample_rate, target), target
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, dtype=np.float32), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def write(path: str | Path, audio: np.ndarray, sample_rate: int, fmt: str | None = None) -> Path:
    """Write audio to `path`; the format comes from `fmt` or the file suffix."""
    path = Path(path)
    data = encode(audio, sample_rate, fmt or format_from_path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
