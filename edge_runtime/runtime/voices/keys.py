"""Voice ids: a content hash of the normalised prompt audio, the model and the transcript, so the
same clip (in any format or rate) is prepared once."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import numpy as np

_KEY_VERSION = b"edge_runtime.voice_key.v1\0"  # bump when the normalisation below changes
_VOICE_ID = re.compile(r"^[0-9a-f]{16,64}$")


def _normalise_audio(audio: np.ndarray) -> np.ndarray:
    """Canonical float32 mono, peak 1.0 (silence stays zero).

    Cast to float32 *first*: float64 audio and its float32 rounding then hash the same. Peak
    normalisation in float32 makes the key blind to gain by powers of two and to the PCM format
    (int16 / int32 / float give bit-identical results, since int/2^k is exact). Arbitrary gains
    (x0.7) usually change the last bit of some samples and so the key: this is a content hash, not
    a perceptual fingerprint; no rounding grid can fix that (some samples always sit on a boundary),
    and a miss only costs one preparation.
    """
    data = np.asarray(audio)
    if data.ndim == 2:  # (frames, channels), soundfile's layout
        data = data.astype(np.float32).mean(axis=1, dtype=np.float32)
    elif data.ndim != 1:
        raise ValueError(f"voice audio must be 1-D mono or 2-D (frames, channels); got shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.size == 0:
        raise ValueError("voice audio is empty")
    if not np.isfinite(data).all():
        raise ValueError("voice audio contains NaN or infinite samples")
    peak = np.abs(data).max()
    if peak > 0:
        data = data / peak
    return (data + np.float32(0.0)).astype("<f4", copy=False)  # + 0.0 turns -0.0 into 0.0


def _normalise_transcript(transcript: str | None) -> str | None:
    if transcript is None:
        return None
    text = " ".join(unicodedata.normalize("NFC", transcript).split())  # NFC + collapse whitespace
    return text or None


def voice_key(audio: np.ndarray, sample_rate: int, model_id: str, transcript: str | None = None) -> str:
    """sha256 (64 hex chars, a valid VoiceLibrary id) of the normalised audio, sample rate, model
    id and transcript: the same clip prepared for another model or transcript is another voice."""
    header = json.dumps({"sample_rate": int(sample_rate), "model_id": str(model_id),
                         "transcript": _normalise_transcript(transcript)}, sort_keys=True)
    digest = hashlib.sha256(_KEY_VERSION)
    digest.update(header.encode("utf-8") + b"\0")
    digest.update(_normalise_audio(audio).tobytes())
    return digest.hexdigest()


def check_voice_id(voice_id: str) -> str:
    """Voice ids are content hashes (16-64 lowercase hex), never paths."""
    if not isinstance(voice_id, str) or not _VOICE_ID.fullmatch(voice_id):
        raise ValueError(f"invalid voice id {voice_id!r}: expected 16 to 64 lowercase hex characters "
                         "(a content hash such as voice_key(...))")
    return voice_id


def is_voice_id(text: str) -> bool:
    """Whether ``text`` has a voice id's shape (any other string is a prompt file path)."""
    return isinstance(text, str) and bool(_VOICE_ID.fullmatch(text))
