"""The voice library as the source of truth: a folder or an fsspec URL, prepared voices with their
sources, damage detected on read and rebuilt (never served), whole-object writes under concurrency."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge_runtime
from edge_runtime.errors import InvalidInputError
from edge_runtime.prepared_voice import PreparedVoice
from edge_runtime.runtime.voices import DamagedVoiceError, VoiceCache, VoiceLibrary, VoiceSource
from edge_runtime.runtime.voices.resolver import VoiceResolver, VoiceUnavailableError

VID = "0123456789abcdef" * 4


def prepared(n: int = 64, model_id: str = "m", seed: int = 0) -> PreparedVoice:
    g = torch.Generator().manual_seed(seed)
    return PreparedVoice(tensors={"emb": torch.randn(n, generator=g), "codes": np.arange(5, dtype=np.int64)},
                         model_id=model_id, sample_rate=16000, transcript="hi", extra={"n": n})


def source(model_id: str = "m") -> VoiceSource:
    return VoiceSource(samples=np.linspace(-1, 1, 800, dtype=np.float32), sample_rate=16000, model_id=model_id,
                       transcript="hi")


@pytest.fixture(params=["folder", "memory"])
def library(request, tmp_path) -> VoiceLibrary:
    """The same library over a local folder and over an fsspec URL (memory://, in-process)."""
    if request.param == "folder":
        return VoiceLibrary(tmp_path / "voices")
    return VoiceLibrary(f"memory://edge-runtime-test-{uuid.uuid4().hex}/voices")


def test_round_trip_with_source(library):
    library.save(VID, prepared(), source())
    assert library.list() == [VID] and VID in library and library.has_source(VID)
    loaded = library.load(VID)
    assert torch.equal(loaded.tensors["emb"], prepared().tensors["emb"])
    np.testing.assert_array_equal(loaded.tensors["codes"], np.arange(5))
    assert (loaded.model_id, loaded.transcript, loaded.extra) == ("m", "hi", {"n": 64})
    back = library.load_source(VID)
    np.testing.assert_array_equal(back.samples, source().samples)
    assert (back.sample_rate, back.model_id, back.transcript) == (16000, "m", "hi")
    meta = library.metadata(VID)
    assert meta["format"] == 2 and len(meta["sha256"]) == 64 and meta["tensors"] == ["codes", "emb"]
    assert library.delete(VID) and not library.delete(VID)
    assert library.list() == [] and not library.has_source(VID)


def _damage(library: VoiceLibrary, name: str, how: str) -> None:
    data = library.storage.read(name)
    if how == "truncate":
        data = data[: len(data) - 7]
    else:  # flip one bit in the last tensor byte: the header still parses
        data = data[:-1] + bytes([data[-1] ^ 1])
    library.storage.write(name, data)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damage_is_detected_and_named(library, how):
    library.save(VID, prepared(), source())
    _damage(library, f"{VID}.safetensors", how)
    with pytest.raises(DamagedVoiceError, match=f"{VID}.safetensors is (corrupt or truncated|truncated)"):
        library.load(VID)
    _damage(library, f"{VID}.source.safetensors", how)
    with pytest.raises(DamagedVoiceError, match=f"{VID}.source.safetensors"):
        library.load_source(VID)


def test_format_1_entries_still_load(tmp_path):
    """Voices saved before sources existed: <id>.safetensors + <id>.json."""
    save_file({"emb": torch.ones(3)}, str(tmp_path / f"{VID}.safetensors"))
    (tmp_path / f"{VID}.json").write_text(json.dumps({"format": 1, "model_id": "m", "sample_rate": 16000,
                                                      "transcript": None, "tensors": ["emb"], "numpy": [],
                                                      "extra": {}, "created": "2026-01-01T00:00:00Z"}))
    library = VoiceLibrary(tmp_path)
    assert library.list() == [VID] and library.metadata(VID)["format"] == 1
    assert torch.equal(library.load(VID).tensors["emb"], torch.ones(3))
    library.save(VID, prepared(), source())  # rewritten in format 2, the old metadata file removed
    assert library.metadata(VID)["format"] == 2 and not (tmp_path / f"{VID}.json").exists()


def test_concurrent_writers_of_one_voice_leave_one_whole_entry(library):
    """Eight writers (as eight replicas uploading the same clip) race: one intact entry remains."""
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        try:
            start.wait()
            for _ in range(5):
                library.save(VID, prepared(n=4096 + seed, seed=seed), source())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    loaded = library.load(VID)  # whole: its checksum holds
    n = loaded.extra["n"]
    assert torch.equal(loaded.tensors["emb"], prepared(n=n, seed=n - 4096).tensors["emb"])
    assert sorted(library.storage.names()) == [f"{VID}.safetensors", f"{VID}.source.safetensors"]  # no temp files


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, samples: np.ndarray, rate: int, transcript: str | None) -> PreparedVoice:
        self.calls += 1
        return prepared(n=len(samples) // 100)


def test_resolver_rebuilds_a_damaged_entry_from_its_source(library):
    prepare = Counting()
    library.save(VID, prepare(source().samples, 16000, "hi"), source())
    _damage(library, f"{VID}.safetensors", "truncate")
    resolver = VoiceResolver(VoiceCache(4, 1 << 20), lambda: library, "m", prepare)
    voice = resolver.lookup(VID)
    assert prepare.calls == 2 and resolver.rebuilt == 1
    assert torch.equal(voice.tensors["emb"], prepared(n=8).tensors["emb"])
    assert torch.equal(library.load(VID).tensors["emb"], voice.tensors["emb"])  # whole again on storage
    assert resolver.lookup(VID) is voice and prepare.calls == 2  # then served from the cache


def test_resolver_removes_an_entry_it_cannot_rebuild(library):
    library.save(VID, prepared())  # no source
    _damage(library, f"{VID}.safetensors", "flip")
    resolver = VoiceResolver(VoiceCache(4, 1 << 20), lambda: library, "m", Counting())
    with pytest.raises(VoiceUnavailableError, match="upload the prompt again"):
        resolver.lookup(VID)
    assert VID not in library and resolver.lookup(VID) is None  # never served; now simply unknown


def test_resolver_refuses_another_models_voice(library):
    library.save(VID, prepared(model_id="other"), source("other"))
    with pytest.raises(ValueError, match="prepared for other, not m"):
        VoiceResolver(VoiceCache(4, 1 << 20), lambda: library, "m", Counting()).lookup(VID)


def test_keep_writes_once_and_repairs(library):
    resolver = VoiceResolver(VoiceCache(4, 1 << 20), lambda: library, "m", Counting())
    assert resolver.keep(VID, prepared(), source()) is True
    assert resolver.keep(VID, prepared(), source()) is False  # already whole: an upload answers 200
    _damage(library, f"{VID}.source.safetensors", "truncate")
    assert resolver.keep(VID, prepared(), source()) is True  # damaged: rewritten
    library.load_source(VID)


def test_an_unusable_library_url_is_named():
    rt = edge_runtime.load(profile="cpu", overrides=("voice_cache.library_dir=nosuchproto://bucket/voices",))
    try:
        with pytest.raises(InvalidInputError, match=r"voice library 'nosuchproto://bucket/voices' "
                                                    r"\(voice_cache.library_dir\) cannot be opened"):
            rt.voice_library()
    finally:
        rt.close()


def test_serve_refuses_an_unusable_library_before_serving(capsys):
    from edge_runtime.serving.cli import main

    assert main(["serve", "--voice-library", "nosuchproto://bucket/voices", "--port", "0", "--no-warm-up",
                 "--profile", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "voice library 'nosuchproto://bucket/voices' (voice_cache.library_dir) cannot be opened" in err
    assert "nosuchproto" in err.rsplit(":", 1)[0] and "Traceback" not in err


def test_a_voice_deleted_from_the_library_leaves_every_cache(library):
    """Another server deleted it: this one's cache stops serving it at its next check."""
    library.save(VID, prepared(), source())
    cache = VoiceCache(4, 1 << 20)
    resolver = VoiceResolver(cache, lambda: library, "m", Counting(), recheck_s=0)
    assert resolver.lookup(VID) is not None and VID in cache
    assert resolver.lookup(VID) is cache.get(VID)  # still there: served from the cache
    library.delete(VID)
    assert resolver.lookup(VID) is None and VID not in cache
    never = VoiceResolver(VoiceCache(4, 1 << 20), lambda: library, "m", Counting(), recheck_s=None)
    library.save(VID, prepared(), source())
    kept = never.lookup(VID)
    library.delete(VID)
    assert never.lookup(VID) is kept  # recheck_s=None: the cache is trusted
