"""Idle unload (the profile's `runtime.keep_alive_s`, as Ollama's `keep_alive`).

After `keep_alive_s` seconds with no request in flight, the loaded model's weights are released
(the model's and the backends' `close`, every reference dropped, then a full collection, the CUDA
cache emptied and the heap trimmed, so RSS / CUDA memory really drops) and come back on the next
request. A request that arrives while the model unloads or reloads waits for it; none fails.

`KeepAlive` is the state machine and the watcher thread; it knows nothing about models. The Runtime
(engine.py) gives it two callables, unload and reload, and holds it around every use of the model:

    loaded --(idle keep_alive_s, nothing in flight)--> unloading --> unloaded
    unloaded --(a request)--> loading --> loaded

While unloaded the Runtime keeps a `ModelFacts` in place of the model, so /health, /v1/models and
the voice store still read the model's id, sample rate and capabilities without reloading it.
Prepared voices (the voice cache) survive an unload: they are small tensors made for this model id,
and the reload brings back the same model (a `voice_cache.device: cuda` cache stays in VRAM, bounded
by voice_cache.max_mib). The CUDA context itself (~0.3-0.5 GiB) stays until the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

STATES = ("loaded", "unloading", "unloaded", "loading")


class ModelUnloadedError(EdgeRuntimeError, AttributeError):
    """The model is unloaded: reach its data through the Runtime (which reloads it), not directly.
    An AttributeError too, so `hasattr` answers False for data that left with the weights."""


class ModelFacts:
    """What an unloaded model still answers without reloading: its static facts (id, sample rate,
    capabilities, speakers, describe()). A method of the model's class is still there (`hasattr`
    answers as when loaded): calling it reloads the model, holding it for that call only (a
    generator it returns is not held: iterate inside `Runtime.using_model()`). Other attributes
    raise ModelUnloadedError, naming `using_model()` as the way in."""

    _FACTS = ("model_id", "family", "sample_rate", "prompt_sample_rate", "supports_voice_prompt", "supports_batch",
              "supports_word_timings", "supports_instructions")

    def __init__(self, model: Any, keep_alive: KeepAlive | None = None,
                 live: Callable[[], Any] | None = None) -> None:
        for name in self._FACTS:
            setattr(self, name, getattr(model, name, None))
        self._speakers = list(model.speakers())
        self._describe = dict(model.describe())
        self.model_class = type(model)
        self._keep_alive, self._live = keep_alive, live

    def speakers(self) -> list[str]:
        return list(self._speakers)

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def components(self) -> dict[str, Any]:
        return {}  # no weights while unloaded

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # only called for names not set above
        state = self.__dict__
        keep_alive, live = state.get("_keep_alive"), state.get("_live")
        if (keep_alive is not None and live is not None and not name.startswith("__")
                and callable(getattr(state.get("model_class"), name, None))):
            def call(*args: Any, **kwargs: Any) -> Any:
                with keep_alive.hold():
                    return getattr(live(), name)(*args, **kwargs)

            return call
        raise ModelUnloadedError(f"{self.__dict__.get('model_id', 'the model')} is unloaded (idle for "
                                 f"runtime.keep_alive_s); use it inside Runtime.using_model(), which reloads it "
                                 f"(asked for {name!r})")


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS whatever the profile's cleanup.malloc_trim says (with
    runtime.reuse_heap glibc would otherwise keep the freed weights in the heap)."""
    from edge_runtime.runtime import memory

    if memory._malloc_trim is None:
        return False
    memory._malloc_trim(0)
    return True


class KeepAlive:
    """Unloads after `seconds` idle (0 or None: never) and reloads on the next `acquire()`.

    `acquire()` / `release()` (or `hold()`) bracket every use of the model; they nest, and the model
    is never unloaded while one is held. `unload()` / `reload()` run outside the state lock: whoever
    finds the model unloaded reloads it, and everyone else arriving meanwhile waits."""

    def __init__(self, seconds: float | None, unload: Callable[[], None], reload: Callable[[], None],
                 *, enabled: bool = True, name: str = "model") -> None:
        self.seconds = float(seconds or 0.0)
        self._unload = unload
        self._reload = reload
        self._cond = threading.Condition()
        self.state = "loaded"
        self._active = 0
        self._last_used = time.monotonic()
        self._closed = False
        self.unloads = 0
        self.reloads = 0
        self.unload_seconds_total = 0.0
        self.reload_seconds_total = 0.0
        self.last_unload_s: float | None = None
        self.last_reload_s: float | None = None
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        if self.seconds > 0 and enabled:
            self._thread = threading.Thread(target=self._watch, name=f"edge-runtime-keep-alive-{name}", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    # -- holding the model ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Mark the model in use; reload it first if it is unloaded (waiting out an unload or
        another caller's reload)."""
        with self._cond:
            while True:
                if self.state == "loaded":
                    self._active += 1
                    return
                if self.state == "unloaded":
                    self.state = "loading"
                    self._cond.notify_all()
                    break
                self._cond.wait()  # unloading, or someone else is loading
        start = time.perf_counter()
        try:
            self._reload()
        except BaseException as exc:
            with self._cond:
                self.state = "unloaded"  # the next caller tries again
                self.last_error = f"reload failed: {type(exc).__name__}: {exc}"
                self._cond.notify_all()
            raise
        seconds = time.perf_counter() - start
        with self._cond:
            self.state = "loaded"
            self.reloads += 1
            self.last_reload_s = seconds
            self.reload_seconds_total += seconds
            self._active += 1
            self._cond.notify_all()
        log.info("reloaded the model in %.2f s", seconds)

    def release(self) -> None:
        with self._cond:
            self._active = max(0, self._active - 1)
            self._last_used = time.monotonic()
            self._cond.notify_all()  # the watcher restarts its idle countdown

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # -- unloading ------------------------------------------------------------------------------
    def unload_now(self) -> bool:
        """Unload at once if nothing is in flight (True when this call unloaded the model)."""
        with self._cond:
            if self.state != "loaded" or self._active or self._closed:
                return False
            self.state = "unloading"
            self._cond.notify_all()
        self._do_unload()
        return True

    def _do_unload(self) -> None:
        start = time.perf_counter()
        try:
            self._unload()
        except Exception as exc:  # noqa: BLE001 - the model stays as it is; serving goes on
            log.exception("idle unload failed; the model stays loaded")
            with self._cond:
                self.state = "loaded"
                self.last_error = f"unload failed: {type(exc).__name__}: {exc}"
                self._last_used = time.monotonic()
                self._cond.notify_all()
            return
        seconds = time.perf_counter() - start
        with self._cond:
            self.state = "unloaded"
            self.unloads += 1
            self.last_unload_s = seconds
            self.unload_seconds_total += seconds
            self._cond.notify_all()
        log.info("model idle for %.1f s: unloaded in %.2f s", self.seconds, seconds)

    def _watch(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self.state == "loaded" and not self._active:
                        left = self.seconds - (time.monotonic() - self._last_used)
                        if left <= 0:
                            self.state = "unloading"
                            self._cond.notify_all()
                            break
                        self._cond.wait(left)
                    else:
                        self._cond.wait()
            self._do_unload()

    def close(self) -> None:
        """Stop the watcher (an unload in progress completes first)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- reporting --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        with self._cond:
            idle = None if self._active or self.state != "loaded" else time.monotonic() - self._last_used
            return {"state": self.state, "keep_alive_s": self.seconds if self.enabled else 0.0,
                    "in_use": self._active, "idle_s": None if idle is None else round(idle, 3),
                    "unloads": self.unloads, "reloads": self.reloads,
                    "last_unload_s": self.last_unload_s, "last_reload_s": self.last_reload_s,
                    "unload_seconds_total": self.unload_seconds_total,
                    "reload_seconds_total": self.reload_seconds_total, "last_error": self.last_error}


def release_memory(governor: Any) -> None:
    """After the model's references are gone: unfreeze the collector's baseline (the model was
    frozen into the permanent generation at load), collect, empty the CUDA cache, trim the heap."""
    from edge_runtime.runtime.memory import MemoryGovernor

    MemoryGovernor.release_baseline()
    governor.cleanup("idle unload")  # a full collection first, then the CUDA cache
    trim_heap()


def can_reload(model_id: str) -> str | None:
    """None when `model_id` resolves again to a loadable source (reload_parts' way back), else why
    not (a Piper .onnx outside the voices folder is known by its stem only)."""
    from edge_runtime.models import registry

    try:
        registry.resolve(model_id)
    except Exception as exc:  # noqa: BLE001 - any reason is a reason not to unload
        return f"{type(exc).__name__}: {exc}"
    return None


def reload_parts(runtime: Any) -> tuple[Any, Any]:
    """Load the runtime's model again as the loader did: same model id, profile and dtype, a fresh
    plan and backend placement. Returns (SpeechModel, Placement)."""
    from edge_runtime.runtime.loader import BackendPlacer, Placement, resolve

    dtype = getattr(runtime.dtype, "dtype", None)
    resolution = resolve(runtime.model.model_id, profile=runtime.profile, dtype=dtype)
    placer = BackendPlacer(resolution)
    model = resolution.source.family.load(resolution.source, placer)
    return model, Placement(resolution.plan, resolution.backend, resolution.device, placer.handles)


class HeldIterator:
    """An iterator that holds the model (KeepAlive) until it is exhausted, fails, is closed or is
    collected: a stream's consumer may read slowly, never start, or stop early."""

    def __init__(self, inner: Iterator[Any], keep_alive: KeepAlive) -> None:
        self._inner = inner
        self._keep_alive: KeepAlive | None = keep_alive

    def __iter__(self) -> HeldIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._inner)
        except BaseException:
            self._let_go()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._let_go()

    def _let_go(self) -> None:
        keep_alive, self._keep_alive = self._keep_alive, None
        if keep_alive is not None:
            keep_alive.release()

    def __del__(self) -> None:
        self._let_go()
