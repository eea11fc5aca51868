"""Voice-prompt audio: decode any common format, mix to mono, resample, trim silence, validate.

Every way a prompt can be unusable (empty, corrupt, not audio, NaN-filled, silent, too long)
raises InvalidInputError naming the problem, so callers never crash on user audio.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edge_runtime.dsp import resample
from edge_runtime.errors import InvalidInputError

SILENCE_DB = -40.0  # frames this far below the loudest frame count as silence at the edges
MIN_SECONDS = 0.5  # shorter than this carries too little of a voice to prepare anything


def decode(data: bytes | str | Path, name: str = "prompt") -> tuple[np.ndarray, int]:
    """Bytes or a file -> (float32 samples [frames] or [frames, channels], sample rate)."""
    import soundfile as sf

    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise InvalidInputError(f"{name} is empty (0 bytes)")
        source = io.BytesIO(data)
    else:
        path = Path(data)
        if not path.is_file():
            raise InvalidInputError(f"{name} {path} does not exist")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"{name} {path} is empty (0 bytes)")
        source = path
    try:
        audio, rate = sf.read(source, dtype="float32", always_2d=False)
    except Exception as exc:  # noqa: BLE001 - libsndfile raises several types for bad data
        raise InvalidInputError(f"{name} is not readable audio ({exc}); use WAV, FLAC, OGG or MP3") from None
    return audio, int(rate)


def trim_silence(audio: np.ndarray, rate: int, frame_ms: float = 20.0) -> np.ndarray:
    """Cut leading and trailing frames quieter than SILENCE_DB relative to the loudest frame."""
    frame = max(1, int(rate * frame_ms / 1000))
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-12
    loud = np.flatnonzero(20 * np.log10(energy / energy.max()) > SILENCE_DB)
    return audio[loud[0] * frame:(loud[-1] + 1) * frame]


def prepare_prompt(data: bytes | str | Path | np.ndarray, target_rate: int, max_seconds: float,
                   sample_rate: int | None = None, name: str = "voice prompt") -> np.ndarray:
    """Any prompt -> clean mono float32 at `target_rate`, validated and capped by `max_seconds`."""
    if isinstance(data, np.ndarray):
        if sample_rate is None:
            raise InvalidInputError(f"{name}: a sample rate is required with raw samples")
        audio, rate = np.asarray(data, dtype=np.float32), int(sample_rate)
    else:
        audio, rate = decode(data, name)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1 or audio.size == 0:
        raise InvalidInputError(f"{name} holds no samples")
    if not np.all(np.isfinite(audio)):
        raise InvalidInputError(f"{name} contains NaN or infinite samples")
    seconds = audio.size / rate
    if seconds > max_seconds:
        raise InvalidInputError(f"{name} is {seconds:.1f} s long; at most {max_seconds:g} s allowed "
                                "(limits.max_prompt_seconds)")
    if float(np.max(np.abs(audio))) < 1e-4:
        raise InvalidInputError(f"{name} is silent")
    audio = trim_silence(resample(audio, rate, target_rate), target_rate)
    if audio.size / target_rate < MIN_SECONDS:
        raise InvalidInputError(f"{name} has only {audio.size / target_rate:.2f} s of sound after trimming "
                                f"silence; at least {MIN_SECONDS} s needed")
    return audio.astype(np.float32, copy=False)
