"""Idle unload (`runtime.keep_alive_s`, as Ollama's keep_alive): after the idle time the model's
weights leave RAM (RSS drops by at least their size), the next request reloads them and speaks
exactly as before; over HTTP, requests arriving during the reload wait and none fails, and /health
and /metrics show each state."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from edge_runtime.policy.profiles import ProfileError
from edge_runtime.runtime.idle import KeepAlive, ModelFacts, ModelUnloadedError

TEXT = "The bakery on the corner opens at seven."


def wait_for(predicate, timeout: float = 60.0, step: float = 0.02):
    """Poll until `predicate()` is truthy (returns it); fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for module in model.components().values():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.fixture(scope="module")
def runtime():
    import edge_runtime

    rt = edge_runtime.load(profile="cpu", overrides=("runtime.threads=1", "runtime.keep_alive_s=0.5"))
    yield rt
    rt.close()


def test_profile_key_defaults_and_validation():
    from edge_runtime.policy.profiles import load_profile

    assert {name: load_profile(name).runtime.keep_alive_s for name in ("cpu", "6gb", "8gb", "12gb", "24gb")} == {
        "cpu": 0, "6gb": 300, "8gb": 300, "12gb": 600, "24gb": 0}
    assert load_profile("cpu", ("runtime.keep_alive_s=null",)).runtime.keep_alive_s is None
    with pytest.raises(ProfileError, match=r"runtime.keep_alive_s = -1 .*seconds >= 0"):
        load_profile("cpu", ("runtime.keep_alive_s=-1",))


def test_idle_unload_frees_memory_and_reload_speaks_the_same(runtime):
    process = psutil.Process()
    weights = weight_bytes(runtime.model)
    assert weights > 60 * 2**20  # the embedded voice: 15.65M parameters in fp32, plus prepared buffers
    with runtime.using_model():  # held while measuring: not unloaded under our feet
        before, _ = runtime.synthesize(TEXT, seed=3)
        loaded_rss = process.memory_info().rss
        assert runtime.model_state["state"] == "loaded"
    state = wait_for(lambda: runtime.model_state if runtime.model_state["state"] == "unloaded" else None)
    unloaded_rss = process.memory_info().rss
    # measured here: RSS drops 138-159 MiB for ~92 MiB of parameters and buffers (prepacked copies go too)
    assert loaded_rss - unloaded_rss >= weights, (loaded_rss >> 20, unloaded_rss >> 20, weights >> 20)
    assert state["unloads"] >= 1 and state["last_unload_s"] > 0
    assert isinstance(runtime.model, ModelFacts) and runtime.model.sample_rate == 22050
    assert runtime.placement["state"] == "unloaded"
    with pytest.raises(ModelUnloadedError, match="using_model"):
        runtime.model.vits  # noqa: B018 - the weights are gone; the Runtime reloads them
    assert not hasattr(runtime.model, "vits") and hasattr(runtime.model, "synthesize_unit")
    assert runtime.model_state["state"] == "unloaded"  # looking is not using: no reload

    reloads = state["reloads"]
    after, rate = runtime.synthesize(TEXT, seed=3)  # reloads, then speaks
    assert rate == 22050 and np.array_equal(after, before)
    state = runtime.model_state
    assert state["reloads"] == reloads + 1 and state["last_reload_s"] > 0
    assert runtime.placement["backend"] == "resident"

    # a second cycle lands on the same floor: nothing of the first model lingers
    wait_for(lambda: runtime.model_state["state"] == "unloaded")
    assert abs(process.memory_info().rss - unloaded_rss) < weights // 2


def test_stream_holds_the_model_until_closed(runtime):
    chunks = runtime.stream("One. Two. Three.", seed=1)
    first = next(chunks)
    assert first.size > 0 and runtime.model_state["in_use"] == 1
    time.sleep(0.7)  # longer than keep_alive_s: a stream being read is not idle
    assert runtime.model_state["state"] == "loaded"
    chunks.close()
    assert runtime.model_state["in_use"] == 0
    wait_for(lambda: runtime.model_state["state"] == "unloaded")
    # using_model() reloads for direct access to the model's own attributes
    reloads = runtime.model_state["reloads"]
    with runtime.using_model():
        assert runtime.model.split_text("Hello. World.") == ["Hello.", "World."]
        assert runtime.model.vits is not None
    assert runtime.model_state["in_use"] == 0 and runtime.model_state["reloads"] == reloads + 1
    # a method called on the unloaded model reloads it for that call
    wait_for(lambda: runtime.model_state["state"] == "unloaded")
    assert runtime.model.split_text("Hello. World.") == ["Hello.", "World."]
    assert runtime.model_state["reloads"] == reloads + 2


def test_keep_alive_waits_out_an_unload_and_reloads_once():
    """Callers arriving during an unload wait for it, then one reloads while the rest wait."""
    unloading, go_on, loads = threading.Event(), threading.Event(), []

    def unload():
        unloading.set()
        go_on.wait(30)

    keep = KeepAlive(0.05, unload, lambda: loads.append(time.monotonic()), name="test")
    try:
        assert unloading.wait(30) and keep.state == "unloading"
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(keep.acquire) for _ in range(4)]
            time.sleep(0.1)
            assert not any(f.done() for f in held)  # none passes while the weights are leaving
            go_on.set()
            for f in held:
                f.result(timeout=30)
        assert len(loads) == 1 and keep.state == "loaded" and keep.describe()["in_use"] == 4
        assert keep.unloads == 1 and keep.reloads == 1
        for _ in range(4):
            keep.release()
        wait_for(lambda: keep.unloads == 2)  # idle again: unloaded again
    finally:
        go_on.set()
        keep.close()


def test_never_unloads_without_keep_alive():
    keep = KeepAlive(0, lambda: None, lambda: None)
    assert not keep.enabled and keep.describe()["keep_alive_s"] == 0.0
    keep.close()


def test_server_reload_under_concurrent_requests(runtime):
    import httpx
    from server_support import metric_value, start

    from edge_runtime.serving.server import ServerSettings

    # hold the unload and the reload until /health was seen saying so (no timing luck needed)
    reloader, seen_loading = runtime._reloader, threading.Event()
    unloader, seen_unloading = runtime.keep_alive._unload, threading.Event()

    def gated_reload():
        seen_loading.wait(60)
        return reloader()

    def gated_unload():
        seen_unloading.wait(60)
        return unloader()

    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "wav", "seed": 3}
    runtime._reloader, runtime.keep_alive._unload = gated_reload, gated_unload
    try:
        with start(ServerSettings(warm_up=False), runtime=runtime) as server, httpx.Client(timeout=120) as http:
            def health():
                return http.get(f"{server.url}/health").json()

            seen_loading.set()  # ungated until the model is held below
            seen_unloading.set()
            first = http.post(f"{server.url}/v1/audio/speech", json=body)
            assert first.status_code == 200
            with runtime.using_model():  # held: it cannot be unloaded while we look
                seen = {health()["model_state"]}
                seen_loading.clear()
                seen_unloading.clear()
            wait_for(lambda: health()["model_state"] == "unloading")
            seen_unloading.set()
            seen.add("unloading")
            wait_for(lambda: health()["model_state"] == "unloaded")
            seen.add("unloaded")
            metrics = http.get(f"{server.url}/metrics").text
            assert metric_value(metrics, "edge_runtime_model_state", state="unloaded") == 1.0
            assert metric_value(metrics, "edge_runtime_model_state", state="loaded") == 0.0
            assert metric_value(metrics, "edge_runtime_model_keep_alive_seconds") == 0.5
            assert metric_value(metrics, "edge_runtime_model_last_unload_seconds") > 0

            with ThreadPoolExecutor(4) as pool:
                answers = [pool.submit(http.post, f"{server.url}/v1/audio/speech", json=body) for _ in range(4)]
                state = wait_for(lambda: (h := health())["model_state"] == "loading" and h)
                seen.add("loading")
                assert state["keep_alive"]["in_use"] == 0 and state["status"] == "ok"
                seen_loading.set()
                results = [a.result(timeout=120) for a in answers]
            assert [r.status_code for r in results] == [200] * 4  # none failed
            assert len({r.content for r in results} | {first.content}) == 1  # same audio as before the unload
            state = health()
            assert state["keep_alive"]["reloads"] >= 1 and state["keep_alive"]["last_reload_s"] > 0
            assert seen == {"loaded", "unloading", "unloaded", "loading"}
            metrics = http.get(f"{server.url}/metrics").text
            assert metric_value(metrics, "edge_runtime_model_last_reload_seconds") > 0
            assert metric_value(metrics, "edge_runtime_model_reloads_total") >= 1
    finally:
        runtime._reloader, runtime.keep_alive._unload = reloader, unloader
        seen_loading.set()
        seen_unloading.set()


def test_only_a_model_that_resolves_again_unloads():
    from edge_runtime.runtime.idle import can_reload

    assert can_reload("piper:en_US-joe-medium") is None
    assert "no Piper voice named 'elsewhere'" in can_reload("piper:elsewhere")  # a .onnx outside the voices folder
