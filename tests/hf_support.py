"""Shared by the transformers-model tests: a voice prompt that is real speech where the system has
it (Debian's alsa-utils samples), else a voiced harmonic signal with a syllable-like envelope; and a
fixture (import it into a test module) sending quantized checkpoints to a temporary cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REAL_SPEECH = Path("/usr/share/sounds/alsa/Front_Center.wav")


def speech_prompt(folder: Path, rate: int = 48000, seconds: float = 1.5) -> Path:
    """A prompt file; the synthetic one is written at ``rate`` so loading resamples it."""
    if REAL_SPEECH.is_file():
        return REAL_SPEECH
    t = np.arange(int(seconds * rate)) / rate
    f0 = 130 + 15 * np.sin(2 * np.pi * 4 * t)  # vibrato
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))  # decaying harmonics
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    path = Path(folder) / "harmonic.wav"
    sf.write(path, (0.3 * voiced * envelope / np.abs(voiced).max()).astype(np.float32), rate)
    return path


@pytest.fixture(scope="module", autouse=True)
def quantized_cache(tmp_path_factory):
    """Quantized checkpoints (runtime/backends/quantized.py) go to a temporary cache, not the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGE_RUNTIME_CACHE_DIR", str(tmp_path_factory.mktemp("edge_cache")))
    yield
    patch.undo()


def check_missing_shard_is_named(folder: Path, tmp_path: Path, capsys, text: str) -> list[str]:
    """A sharded folder missing one shard: load() and `say` (exit 2, no traceback) name that shard.
    Returns the folder's shard names."""
    import json
    import shutil

    import edge_runtime
    from edge_runtime.errors import ModelNotFoundError
    from edge_runtime.serving.cli import main

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # saved sharded

    no_shard = shutil.copytree(folder, tmp_path / "no-shard")
    (no_shard / shards[1]).unlink()
    with pytest.raises(ModelNotFoundError, match=shards[1]):
        edge_runtime.load(model=str(no_shard), profile="cpu")
    assert main(["say", "--model", str(no_shard), text, "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert shards[1] in err and "Traceback" not in err
    return shards
