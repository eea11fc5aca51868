"""The FastAPI app: wires one loaded Runtime to the batch tuner, scheduler and worker, services,
routes, errors and metrics.

Lifespan: start-up warms the model (measuring the batch curve for `max_batch: auto`, within the
plan's batch bound) on the inference worker before the first request is accepted; shut-down
(after uvicorn has stopped accepting and finished in-flight requests) drains the scheduler and
stops the worker thread.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from edge_runtime import __version__
from edge_runtime.serving.batch_tuner import BatchTuner
from edge_runtime.serving.scheduler import Scheduler
from edge_runtime.serving.server.auth import APIKeyMiddleware
from edge_runtime.serving.server.errors import install_error_handlers
from edge_runtime.serving.server.limits import BodyLimitMiddleware
from edge_runtime.serving.server.metrics import RequestCounter, ServerMetrics
from edge_runtime.serving.server.routes import build_router
from edge_runtime.serving.server.settings import ServerSettings, log
from edge_runtime.serving.server.speech import SpeechService
from edge_runtime.serving.server.voice_store import VoiceStore
from edge_runtime.serving.server.web import build_web_router
from edge_runtime.serving.worker import Worker


def create_app(runtime: Any, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `runtime`. It takes no ownership: closing the runtime is the caller's job."""
    settings = settings or ServerSettings()
    limits = settings.resolved(runtime.profile)
    metrics = ServerMetrics(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # bounded by the plan's VRAM budget; a gather holds the head plus at most queue_size queued
        tuner = BatchTuner.for_runtime(runtime, limits["max_batch"], max_size=limits["queue_size"] + 1)
        worker = Worker(runtime, tuner, on_batch=metrics.observe_batch)
        await worker.warm_up(settings.warm_up)
        scheduler = Scheduler(tuner, max_wait_ms=limits["max_wait_ms"], queue_size=limits["queue_size"],
                              request_timeout_s=limits["request_timeout_s"])
        worker.start(scheduler)
        metrics.watch_scheduler(scheduler, tuner)
        voices = VoiceStore(runtime, scheduler, settings.max_upload_bytes)
        app.state.scheduler = scheduler
        app.state.tuner = tuner
        app.state.voices = voices
        app.state.speech = SpeechService(runtime, scheduler, voices, metrics)
        app.state.draining = False
        app.state.started_at = time.time()
        settings.announce(tuner.describe())
        warning = tuner.warning()
        if warning:  # serve prints it with the other start-up lines; embedded, it is a logged warning
            (log.warning if settings.announce == log.info else settings.announce)(f"warning: {warning}")
        try:
            yield
        finally:
            app.state.draining = True
            await scheduler.close(timeout=settings.shutdown_timeout_s)
            await worker.close()

    app = FastAPI(title="edge_runtime", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible text-to-speech on the hardware you have.")
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(build_router())
    app.include_router(build_web_router())  # the page at / and GET /v1/stats
    # added last = outermost: count every answer, refuse a missing key before any body is read
    app.add_middleware(BodyLimitMiddleware, max_json_bytes=settings.max_json_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    key = settings.key()
    if key:
        app.add_middleware(APIKeyMiddleware, api_key=key)
    app.add_middleware(RequestCounter, metrics=metrics)
    if not key:
        log.info("no API key set: every client that can reach the port may use the server")
    return app
