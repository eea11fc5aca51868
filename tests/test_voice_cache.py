"""Voice keys, the bounded LRU voice cache and the on-disk voice library."""

from __future__ import annotations

import gc
import json
import random
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from edge_runtime.runtime.voices import DamagedVoiceError, PreparedVoice, VoiceCache, VoiceLibrary, voice_key

KiB = 1024


def voice(nbytes: int = 4 * KiB, model_id: str = "m", **extra_tensors) -> PreparedVoice:
    tensors = {"features": torch.zeros(nbytes // 4, dtype=torch.float32), **extra_tensors}
    return PreparedVoice(tensors=tensors, model_id=model_id, sample_rate=24000, transcript="hello")


def clip(seconds: float = 1.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(seconds * sr))).astype(np.float32)


# -- keys -------------------------------------------------------------------------------------
def test_key_is_a_sha256_hex_and_stable():
    audio = clip()
    key = voice_key(audio, 16000, "xtts", "hi there")
    assert len(key) == 64 and int(key, 16) >= 0
    assert voice_key(audio.copy(), 16000, "xtts", "hi there") == key


def test_key_ignores_dtype_gain_by_powers_of_two_and_pcm_format():
    audio = clip()
    key = voice_key(audio, 16000, "m")
    assert voice_key(audio.astype(np.float64), 16000, "m") == key
    for gain in (0.5, 0.25, 2.0, 4.0):
        assert voice_key(audio * gain, 16000, "m") == key
    pcm16 = np.round(audio / np.abs(audio).max() * 32767).astype(np.int16)
    as_float = pcm16.astype(np.float32) / 32768.0  # what soundfile returns for the same file
    assert voice_key(pcm16, 16000, "m") == voice_key(as_float, 16000, "m")
    assert voice_key(pcm16.astype(np.int32) * 65536, 16000, "m") == voice_key(pcm16, 16000, "m")


def test_key_mixes_stereo_down_to_mono():
    audio = clip()
    assert voice_key(np.stack([audio, audio], axis=1), 16000, "m") == voice_key(audio, 16000, "m")


def test_key_separates_what_makes_a_different_voice():
    audio = clip()
    base = voice_key(audio, 16000, "m", "one two")
    assert voice_key(audio, 16000, "m", "one three") != base
    assert voice_key(audio, 16000, "m", None) != base
    assert voice_key(audio, 22050, "m", "one two") != base
    assert voice_key(audio, 16000, "other", "one two") != base
    assert voice_key(clip(seed=1), 16000, "m", "one two") != base
    assert voice_key(audio[:-1], 16000, "m", "one two") != base
    # whitespace and Unicode composition are trivia
    assert voice_key(audio, 16000, "m", "  one\ttwo\n") == base
    assert voice_key(audio, 16000, "m", "caf\u00e9") == voice_key(audio, 16000, "m", "cafe\u0301")
    assert voice_key(audio, 16000, "m", "   ") == voice_key(audio, 16000, "m", None)


def test_key_rejects_unusable_audio():
    for bad in (np.zeros(0, np.float32), np.array([0.1, np.nan], np.float32), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError):
            voice_key(bad, 16000, "m")
    assert voice_key(np.zeros(100), 16000, "m") == voice_key(-np.zeros(100), 16000, "m")  # silence


# -- cache bounds and LRU ---------------------------------------------------------------------
def test_bounded_by_entry_count_in_lru_order():
    cache = VoiceCache(max_entries=3, max_bytes=1 << 30)
    for k in "abc":
        cache.put(k, voice())
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", voice())
    assert "b" not in cache and all(k in cache for k in "acd")
    cache.put("e", voice())
    assert "c" not in cache
    s = cache.stats()
    assert (s["entries"], s["evictions"], s["hits"], s["misses"]) == (3, 2, 1, 0)


def test_bounded_by_bytes():
    cache = VoiceCache(max_entries=100, max_bytes=10 * KiB)
    cache.put("a", voice(4 * KiB))
    cache.put("b", voice(4 * KiB))
    assert cache.stats()["bytes"] == 8 * KiB
    cache.put("c", voice(4 * KiB))  # 12 KiB > 10 KiB: a goes
    assert "a" not in cache and cache.stats()["bytes"] == 8 * KiB
    cache.put("d", voice(10 * KiB))  # exactly the limit: fits alone, everything else goes
    assert len(cache) == 1 and cache.stats()["bytes"] == 10 * KiB and cache.stats()["evictions"] == 3


def test_oversize_item_is_returned_not_cached():
    cache = VoiceCache(max_entries=4, max_bytes=8 * KiB)
    cache.put("a", voice(4 * KiB))
    big = voice(16 * KiB)
    assert cache.put("big", big) is big
    assert "big" not in cache and "a" in cache
    s = cache.stats()
    assert (s["rejected"], s["evictions"], s["entries"]) == (1, 0, 1)


def test_zero_limits_disable_caching():
    cache = VoiceCache(max_entries=0, max_bytes=1 << 20)
    cache.put("a", voice())
    assert len(cache) == 0 and cache.stats()["rejected"] == 1


def test_bounds_hold_after_any_sequence_of_puts():
    rng = random.Random(1234)
    for trial in range(20):
        max_entries, max_bytes = rng.randint(1, 8), rng.randint(1, 64) * KiB
        cache = VoiceCache(max_entries, max_bytes)
        model: dict[str, int] = {}  # key -> bytes, kept by the test independently
        for step in range(300):
            key = f"k{rng.randint(0, 20)}"
            op = rng.random()
            if op < 0.7:
                size = rng.choice([4, 64, 1024, 4096, 16384, 70000]) // 4 * 4
                cache.put(key, voice(size))
                if size <= max_bytes:
                    model[key] = size
            elif op < 0.9:
                cache.get(key)
            else:
                cache.remove(key)
                model.pop(key, None)
            s = cache.stats()
            assert s["entries"] <= max_entries and s["bytes"] <= max_bytes, (trial, step, s)
            cached = {k: model[k] for k in model if k in cache}
            assert s["bytes"] == sum(cached.values()) and s["entries"] == len(cached)


def test_counters():
    cache = VoiceCache(max_entries=2, max_bytes=1 << 20)
    assert cache.get("x") is None
    cache.put("x", voice())
    assert cache.get("x") is not None and cache.get("x") is not None
    assert cache.remove("x") and not cache.remove("x")
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"]) == (2, 1, 0, 0)
    assert (s["max_entries"], s["max_bytes"]) == (2, 1 << 20)


def test_replacing_a_key_does_not_double_count():
    cache = VoiceCache(max_entries=4, max_bytes=1 << 20)
    cache.put("a", voice(4 * KiB))
    cache.put("a", voice(8 * KiB))
    assert cache.stats()["bytes"] == 8 * KiB and len(cache) == 1


def test_numpy_arrays_count_towards_bytes():
    v = voice(4 * KiB, codes=np.zeros(256, dtype=np.int64))
    assert v.nbytes == 4 * KiB + 2 * KiB
    cache = VoiceCache(4, 1 << 20)
    cache.put("a", v)
    assert cache.stats()["bytes"] == 6 * KiB


def test_views_of_larger_buffers_are_copied_so_eviction_frees_them():
    big = torch.zeros(1 << 20)
    stored = VoiceCache(4, 1 << 20).put("a", PreparedVoice({"f": big[:16]}, "m", 16000))
    assert stored.tensors["f"].untyped_storage().nbytes() == 64
    assert stored.tensors["f"].untyped_storage().data_ptr() != big.untyped_storage().data_ptr()


def test_tensors_are_detached_and_on_the_cache_device():
    t = torch.ones(4, requires_grad=True) * 2
    stored = VoiceCache(4, 1 << 20, device="cpu").put("a", PreparedVoice({"f": t}, "m", 16000))
    assert stored.tensors["f"].device.type == "cpu" and not stored.tensors["f"].requires_grad


@pytest.mark.gpu
def test_tensors_moved_to_cuda_cache():
    stored = VoiceCache(4, 1 << 20, device="cuda").put("a", voice())
    assert stored.tensors["features"].is_cuda


# -- release ----------------------------------------------------------------------------------
def _cached_tensor_ref(cache: VoiceCache, key: str) -> weakref.ref:
    cache.put(key, voice())  # the caller keeps nothing: the cache holds the only reference
    ref = weakref.ref(cache.get(key).tensors["features"])
    assert ref() is not None
    return ref


def test_eviction_releases_tensors():
    cache = VoiceCache(max_entries=1, max_bytes=1 << 20)
    ref = _cached_tensor_ref(cache, "a")
    gc.collect()
    assert ref() is not None  # still cached
    cache.put("b", voice())
    gc.collect()
    assert ref() is None and cache.stats()["evictions"] == 1


def test_byte_eviction_remove_and_clear_release_tensors():
    cache = VoiceCache(max_entries=10, max_bytes=8 * KiB)
    evicted = _cached_tensor_ref(cache, "a")
    removed = _cached_tensor_ref(cache, "b")
    cache.remove("b")
    cache.put("c", voice(8 * KiB))  # byte bound: a goes
    cleared = _cached_tensor_ref(VoiceCache(10, 1 << 20), "x")  # a cache nobody holds
    cache2 = VoiceCache(10, 1 << 20)
    refs = [_cached_tensor_ref(cache2, k) for k in "pqr"]
    cache2.clear()
    gc.collect()
    assert evicted() is None and removed() is None and cleared() is None
    assert all(r() is None for r in refs) and cache2.stats()["bytes"] == 0


# -- get_or_prepare ---------------------------------------------------------------------------
def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll until `condition()` holds (a liveness bound only, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_get_or_prepare_hit_and_miss():
    cache = VoiceCache(4, 1 << 20)
    calls = []
    v1, hit1 = cache.get_or_prepare("k", lambda: calls.append(1) or voice())
    v2, hit2 = cache.get_or_prepare("k", lambda: calls.append(1) or voice())
    assert (hit1, hit2, len(calls)) == (False, True, 1) and v1 is v2


def test_get_or_prepare_runs_prepare_once_for_concurrent_callers():
    cache = VoiceCache(4, 1 << 20)
    started, release = threading.Event(), threading.Event()
    calls = []

    def prepare():
        calls.append(threading.get_ident())
        started.set()
        release.wait(10)
        return voice()

    results = []
    lock = threading.Lock()

    def worker():
        result = cache.get_or_prepare("k", prepare)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    threads[0].start()
    assert started.wait(10)  # one thread is inside prepare; the rest arrive while it runs
    for th in threads[1:]:
        th.start()
    assert wait_for(lambda: cache.stats()["coalesced"] == 7)  # all seven wait on the one preparation
    release.set()
    for th in threads:
        th.join(10)
    assert len(calls) == 1 and len(results) == 8
    assert len({id(v) for v, _ in results}) == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 7
    s = cache.stats()
    assert (s["misses"], s["hits"], s["entries"], s["coalesced"]) == (1, 7, 1, 7)


def test_get_or_prepare_failure_reaches_waiters_and_is_not_cached():
    cache = VoiceCache(4, 1 << 20)
    started, release = threading.Event(), threading.Event()

    def failing():
        started.set()
        release.wait(10)
        raise RuntimeError("bad prompt")

    errors = []

    def worker():
        try:
            cache.get_or_prepare("k", failing)
        except RuntimeError as exc:
            errors.append(str(exc))

    first = threading.Thread(target=worker)
    first.start()
    assert started.wait(10)
    others = [threading.Thread(target=worker) for _ in range(3)]
    for th in others:
        th.start()
    assert wait_for(lambda: cache.stats()["coalesced"] == 3)
    release.set()
    for th in [first, *others]:
        th.join(10)
    assert errors == ["bad prompt"] * 4
    assert "k" not in cache
    v, hit = cache.get_or_prepare("k", voice)  # a later call prepares afresh
    assert not hit and "k" in cache


# -- library ----------------------------------------------------------------------------------
def test_library_round_trip(tmp_path):
    lib = VoiceLibrary(tmp_path / "voices")
    vid = voice_key(clip(), 16000, "m", "hello")
    original = PreparedVoice(tensors={"emb": torch.randn(3, 5), "mask": torch.tensor([True, False]),
                                      "codes": np.arange(7, dtype=np.int64)},
                             model_id="m", sample_rate=24000, transcript="hello", extra={"lang": "en"})
    lib.save(vid, original)
    assert lib.list() == [vid] and vid in lib
    loaded = lib.load(vid)
    assert (loaded.model_id, loaded.sample_rate, loaded.transcript, loaded.extra) == ("m", 24000, "hello", {"lang": "en"})
    torch.testing.assert_close(loaded.tensors["emb"], original.tensors["emb"])
    assert loaded.tensors["mask"].dtype == torch.bool
    assert isinstance(loaded.tensors["codes"], np.ndarray)
    np.testing.assert_array_equal(loaded.tensors["codes"], original.tensors["codes"])
    meta = lib.metadata(vid)
    assert meta["tensors"] == ["codes", "emb", "mask"] and meta["created"].endswith("Z") and meta["format"] == 2
    assert not [p for p in (tmp_path / "voices").iterdir() if p.name.startswith(".")]  # no temp files left
    assert lib.delete(vid) and not lib.delete(vid)
    assert lib.list() == [] and list((tmp_path / "voices").iterdir()) == []


def test_library_save_overwrites_atomically(tmp_path):
    lib = VoiceLibrary(tmp_path)
    vid = "0123456789abcdef"
    lib.save(vid, voice(4 * KiB))
    lib.save(vid, voice(8 * KiB))
    assert lib.load(vid).tensors["features"].numel() == 2 * KiB and lib.list() == [vid]


def test_library_load_missing_names_the_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="0123456789abcdef"):
        VoiceLibrary(tmp_path).load("0123456789abcdef")


def test_library_lists_voices_only_and_names_a_damaged_one(tmp_path):
    lib = VoiceLibrary(tmp_path)
    lib.save("aaaaaaaaaaaaaaaa", voice())
    (tmp_path / "bbbbbbbbbbbbbbbb.safetensors").write_bytes(b"")  # damaged from outside: listed, never served
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "cccccccccccccccc.source.safetensors").write_bytes(b"x")
    assert lib.list() == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
    with pytest.raises(DamagedVoiceError, match="bbbbbbbbbbbbbbbb.safetensors is truncated"):
        lib.load("bbbbbbbbbbbbbbbb")


@pytest.mark.parametrize("bad", ["../etc/passwd", "abc", "0123456789ABCDEF", "0123456789abcdeg",
                                 "a" * 65, "/tmp/" + "a" * 16, "a" * 16 + ".json", "", None])
def test_library_rejects_bad_ids(tmp_path, bad):
    lib = VoiceLibrary(tmp_path)
    for call in (lambda: lib.save(bad, voice()), lambda: lib.load(bad), lambda: lib.delete(bad)):
        with pytest.raises(ValueError, match="invalid voice id") as info:
            call()
        assert repr(bad) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_library_does_not_use_pickle(tmp_path, monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "dump", forbidden)
    lib = VoiceLibrary(tmp_path)
    lib.save("c" * 16, voice())
    assert lib.load("c" * 16).model_id == "m"
