"""Match a voice prompt to the nearest built-in speaker of a multi-speaker model.

Voices without zero-shot cloning (Piper) can still honour "sound like this clip" by choosing the
speaker whose own speech is spectrally closest. The fingerprint is the mean and spread of 40
log-mel bands over the voiced frames at 16 kHz: cheap, deterministic, no extra weights. It ranks
speakers by timbre and pitch region; it is not a speaker-verification embedding.
"""

from __future__ import annotations

import numpy as np

RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms windows, 10 ms hop


def _mel_filterbank() -> np.ndarray:
    """Triangular filters on the HTK mel scale, [N_MELS, N_FFT // 2 + 1]."""
    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def mel_to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(60.0), hz_to_mel(7600.0), N_MELS + 2))
    bins = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


_FILTERS = _mel_filterbank()


def log_mel(audio16k: np.ndarray) -> np.ndarray:
    """[frames, N_MELS] log-mel energies of 16 kHz mono audio."""
    if len(audio16k) < N_FFT:
        audio16k = np.pad(audio16k, (0, N_FFT - len(audio16k)))
    n = 1 + (len(audio16k) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    frames = audio16k[idx] * np.hanning(N_FFT).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return np.log(power @ _FILTERS.T + 1e-6).astype(np.float32)


def fingerprint(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Unit-length [2 * N_MELS] vector: per-band mean and std of the voiced frames."""
    from edge_runtime.dsp import resample

    mel = log_mel(resample(np.asarray(audio, dtype=np.float32), sample_rate, RATE))
    energy = mel.mean(axis=1)
    voiced = mel[energy > energy.max() - 6.0]  # within ~26 dB of the loudest frame
    if len(voiced) < 3:
        voiced = mel
    vec = np.concatenate([voiced.mean(axis=0), voiced.std(axis=0)])
    vec = vec - vec.mean()
    return (vec / (np.linalg.norm(vec) + 1e-9)).astype(np.float32)


def nearest(query: np.ndarray, references: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the closest reference row (cosine similarity) and all similarities."""
    sims = references @ query
    return int(np.argmax(sims)), sims
