"""The web page at `/` and the JSON it polls (`GET /v1/stats`).

The page (static/index.html, app.js, style.css, shipped as package data) uses only the server's own
API: /v1/voices, /v1/models, /v1/audio/speech and /v1/stats, with the API key the user types sent
as `Authorization: Bearer KEY`. Nothing is fetched from anywhere else, at build or run time.

/v1/stats is read-only and cheap (a few dict reads, one RSS read): memory now (RSS, and CUDA
allocated/reserved/peak on a GPU), queue, batch size, voice cache, the idle-unload state, the recent
requests' time to first audio and real-time factor (the runtime's telemetry window), and where each
component of the model sits, from the loader's plan (like `ollama ps`). It lives under /v1/, so the
API key middleware guards it like every other /v1 route; the page itself is open (it holds no data).
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from edge_runtime.runtime.memory import peak_rss_bytes
from edge_runtime.serving.server.errors import APIError

RECENT_REQUESTS = 20  # rows of the page's request table
STATIC_FILES = {  # name -> media type: the only files served (no path from the request reaches the disk)
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# the page may not load anything from another origin; inline script/style are not used either
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _static(name: str) -> bytes:
    return resources.files("edge_runtime.serving.server").joinpath("static", name).read_bytes()


def where(placement: str, precision: str) -> str:
    """The plan's placement in the words of the page: resident (GPU), streamed from X, CPU; plus
    the quantized precision when there is one."""
    if placement == "gpu":
        place = "resident"
    elif placement.startswith("stream:"):
        place = f"streamed from {placement.split(':', 1)[1]}"
    elif placement == "cpu":
        place = "CPU"
    else:
        place = placement
    return f"{place}, {precision}" if precision else place


def components(runtime: Any) -> list[dict[str, Any]]:
    """One row per (component, placement, precision) in plan order: blocks, bytes, where it sits."""
    plan = getattr(runtime, "plan", None)
    if plan is None:
        return []
    rows: list[dict[str, Any]] = []
    for block in plan.blocks:
        precision = block.precision or ""
        key = (block.submodel, block.component, block.placement, precision)
        if rows and rows[-1]["_key"] == key:
            row = rows[-1]
        else:
            row = {"_key": key, "component": block.component, "submodel": block.submodel,
                   "placement": block.placement, "precision": precision or plan.dtype,
                   "quantized": bool(precision), "where": where(block.placement, precision),
                   "blocks": 0, "bytes": 0, "autoregressive": block.autoregressive}
            rows.append(row)
        row["blocks"] += 1
        row["bytes"] += block.bytes
    for row in rows:
        del row["_key"]
    return rows


def _request_row(item: Any) -> dict[str, Any]:
    data = item.to_dict()
    return {key: data.get(key) for key in ("request_id", "timestamp", "latency_s", "time_to_first_audio_s",
                                           "rtf", "audio_seconds", "batch_size", "voice_cache", "rss_bytes",
                                           "cuda_allocated", "cuda_reserved", "cuda_peak", "error")}


def gather_stats(state: Any) -> dict[str, Any]:
    runtime = state.runtime
    snap = runtime.governor.snapshot()
    memory: dict[str, Any] = {"rss_bytes": snap.rss_bytes, "rss_peak_bytes": peak_rss_bytes(),
                              "cuda_allocated_bytes": snap.cuda_allocated,
                              "cuda_reserved_bytes": snap.cuda_reserved, "cuda_peak_bytes": snap.cuda_peak}
    telemetry = runtime.telemetry
    recent = [_request_row(item) for item in telemetry.recent(RECENT_REQUESTS)]
    scheduler = getattr(state, "scheduler", None)
    queue = {"depth": scheduler.depth if scheduler is not None else 0,
             "running": scheduler.running if scheduler is not None else 0,
             "max_batch": scheduler.max_batch if scheduler is not None else None,
             "last_batch_size": recent[-1]["batch_size"] if recent else None}
    placement = dict(runtime.placement)
    plan = getattr(runtime, "plan", None)
    dtype = getattr(runtime, "dtype", None)
    model_state = getattr(runtime, "model_state", None)  # idle unload (runtime.keep_alive_s)
    return {
        "object": "stats",
        "time": time.time(),
        "uptime_s": round(time.time() - getattr(state, "started_at", time.time()), 3),
        "model": runtime.model.model_id,
        "profile": runtime.profile.name,
        "sample_rate": runtime.sample_rate,
        "device": runtime.device,
        "dtype": getattr(dtype, "dtype", None) or (plan.dtype if plan is not None else None),
        "draining": bool(getattr(state, "draining", False)),
        "model_state": model_state,
        "memory": memory,
        "queue": queue,
        "requests": {**telemetry.summary(), "recent": recent},
        "voice_cache": runtime.voice_cache.stats(),
        "placement": {"backend": placement.get("backend"), "device": placement.get("device"),
                      "target": placement.get("target"),
                      "resident_bytes": placement.get("resident_bytes", 0),
                      "streamed_bytes": placement.get("streamed_bytes", 0),
                      "cpu_bytes": plan.cpu_bytes if plan is not None else None,
                      "bytes_moved": placement.get("bytes_moved", 0), "state": placement.get("state")},
        "components": components(runtime),
    }


def page(request: Request) -> Response:
    return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


def static_file(name: str, request: Request) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise APIError(404, f"no static file {name!r}; available: {', '.join(STATIC_FILES)}", param="name",
                       code="not_found")
    return Response(_static(name), media_type=media_type, headers={"Cache-Control": "no-cache"})


def stats(request: Request) -> JSONResponse:
    return JSONResponse(gather_stats(request.app.state), headers={"Cache-Control": "no-store"})


def build_web_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/", page, methods=["GET"], include_in_schema=False, response_class=Response)
    router.add_api_route("/static/{name}", static_file, methods=["GET"], include_in_schema=False,
                         response_class=Response)
    router.add_api_route("/v1/stats", stats, methods=["GET"], tags=["ops"],
                         summary="Live figures for the web page: memory, queue, requests, voice cache, placement")
    return router
