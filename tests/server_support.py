"""Helpers for the server tests: one runtime per test process (loading it is the slow part), real
uvicorn servers on free loopback ports in background threads, and voice-prompt files."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
import threading
import time

import numpy as np
import soundfile as sf

API_KEY = "test-key-0123"


@functools.lru_cache(maxsize=1)
def shared_runtime():
    """The embedded voice on the cpu profile, one thread (on a shared 2-core machine more threads
    oversubscribe and every call gets many times slower), voices saved under a temporary folder."""
    import edge_runtime

    library = tempfile.mkdtemp(prefix="edge_runtime_voices_")
    atexit.register(shutil.rmtree, library, ignore_errors=True)
    return edge_runtime.load(profile="cpu", overrides=("runtime.threads=1", f"voice_cache.library_dir={library}"))


class ServerThread:
    """`with ServerThread(app) as server:` serves `app` on 127.0.0.1 at `server.url`."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server did not start (see the log)")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


def start(settings=None, runtime=None) -> ServerThread:
    from edge_runtime.serving.server import ServerSettings, create_app

    settings = settings or ServerSettings(warm_up=False)
    return ServerThread(create_app(runtime or shared_runtime(), settings))


def wav_bytes(audio: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def speech_prompt() -> bytes:
    """About two seconds of real speech (the embedded voice itself) as a 16-bit WAV."""
    rt = shared_runtime()
    audio, rate = rt.synthesize("This is my voice, recorded for the test.", seed=1)
    return wav_bytes(audio, rate)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text exposition (0.0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_part = key.partition("{")
        if sample == name and label_part.rstrip("}") == wanted:
            return float(value)
    return 0.0
