"""Request body size limits, enforced while the body arrives (413 before it is all in memory).

Hand-written rather than FastAPI's `max_body_size` because Starlette's limiter answers a declared
oversize Content-Length with its own plain-text 413, not OpenAI's error JSON. A declared length
over the limit is refused at once; a chunked body is counted as it is read, and the read fails with
BodyTooLargeError (an HTTPException, so FastAPI's body parsing passes it on) past the limit.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_runtime.serving.server.errors import error_response

UPLOAD_PATHS = ("/v1/voices",)
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the transcript field


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes ({limit / 1024 / 1024:.2f} MiB)")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_json_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json = max_json_bytes
        self.max_upload = max_upload_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"] in UPLOAD_PATHS else self.max_json
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, BodyTooLargeError(limit).detail, code="body_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, counted, send)
