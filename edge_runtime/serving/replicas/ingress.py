"""The thin ingress: reads each request's body, picks the route key, forwards to a model replica.

Ray's router sees only what a handle call carries, and OpenAI clients put the voice in the JSON
body, so this deployment (no CPU of its own) reads the body first: a speech request for an uploaded
voice (`X-Voice-Id` header, else the body's `voice`, a string or `{"id": ...}`) goes through Ray's
model multiplexing keyed on the voice id, to the replica that has it prepared; anything else goes
to the least loaded replica (Ray's power of two choices). /metrics is answered here, merged from
every replica (metrics_board.py).

A replica that dies under a request, or Serve refusing more work, is a 503 with Retry-After in our
error shape: the client retries, and Ray routes the retry to a live replica.
"""

# no `from __future__ import annotations`: serve.ingress rebuilds the methods' signatures, and
# FastAPI then cannot resolve string annotations such as Request
import json
import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from edge_runtime.serving.replicas.forwarding import Forwarded
from edge_runtime.serving.replicas.metrics_board import board, merge

log = logging.getLogger("edge_runtime.serving.replicas")

SPEECH_PATH = "/v1/audio/speech"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# ActorDiedError and ActorUnavailableError are RayActorErrors
UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)
RETRY_AFTER_S = 1  # a replacement replica takes ~3 s; the other replicas take the retry at once

# the replicas' own docs and OpenAPI schema are forwarded, not shadowed by the ingress's
api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, message: str, **fields: Any) -> Response:
    # imported when needed: the server package (and the runtime's voices package below) import
    # torch, which this process otherwise never needs, and importing it delays every start-up
    from edge_runtime.serving.server.errors import error_response

    return error_response(status, message, **fields)


def voice_key(method: str, path: str, headers: Any, body: bytes) -> Optional[str]:
    """The uploaded voice a request is for, or None (built-in voices, other endpoints)."""
    if method != "POST" or path != SPEECH_PATH:
        return None
    from edge_runtime.runtime.voices.keys import is_voice_id

    voice = headers.get("x-voice-id")
    if voice is None:
        try:
            voice = json.loads(body).get("voice")
        except (ValueError, AttributeError):
            return None  # the replica answers the malformed body with its usual 400
        if isinstance(voice, dict):
            voice = voice.get("id")
    return voice if isinstance(voice, str) and is_voice_id(voice) else None


async def _read_body(request: Request, limit: int) -> Optional[bytes]:
    """The whole body, or None past `limit` bytes (the replica enforces the exact limits)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _rest(first: Any, answer: Any):
    yield first
    async for chunk in answer:
        # a replica dying mid-answer raises here: the connection is cut, so the client sees a
        # truncated answer fail instead of accepting it as complete
        yield chunk


@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: Any, routing: str, max_body_bytes: int) -> None:
        self.replicas = replicas.options(stream=True)
        self.affinity = routing == "voice"
        self.max_body_bytes = max_body_bytes
        self.board = board(serve.get_replica_context().app_name)
        # what voice_key and error_response import, loaded now (beside the replicas' start-up),
        # not on the first request: the import path passes through torch
        import edge_runtime.runtime.voices.keys  # noqa: F401
        import edge_runtime.serving.server.errors  # noqa: F401

    @api.get("/metrics")
    async def metrics(self) -> Response:
        texts = await self.board.fresh.remote()
        return Response(merge(texts), media_type=CONTENT_TYPE_LATEST)

    @api.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await _read_body(request, self.max_body_bytes)
        if body is None:
            return error_response(413, f"request body is larger than {self.max_body_bytes} bytes",
                                  code="body_too_large")
        scope = request.scope
        path = scope["path"]
        req = Forwarded(request.method, path, scope.get("query_string", b""), list(scope["headers"]), body,
                        scope.get("client"))
        voice = voice_key(request.method, path, request.headers, body) if self.affinity else None
        handle = self.replicas.options(multiplexed_model_id=voice) if voice else self.replicas
        answer = handle.forward.remote(req)
        try:
            status, headers, first, complete = await answer.__anext__()
        except UNAVAILABLE as exc:
            log.warning("%s %s: no replica answered (%s)", request.method, path, type(exc).__name__)
            return error_response(503, f"no replica could take the request ({type(exc).__name__}); retry "
                                       f"after {RETRY_AFTER_S} s", code="replica_unavailable",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        except Exception:
            log.exception("%s %s failed in a replica", request.method, path)
            return error_response(500, "internal error in a replica; the server logged the details",
                                  code="internal_error")
        if complete:  # the whole answer came in one item: no need to wait for the stream's end
            response = Response(first, status_code=status)
            length = [(k, v) for k, v in response.raw_headers if k == b"content-length"]
            response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + length
        else:
            response = StreamingResponse(_rest(first, answer), status_code=status)
            response.raw_headers = headers
        return response
