"""Optional API key for /v1/*: `Authorization: Bearer KEY` (what OpenAI clients send).

A pure ASGI middleware, so a request without the key is refused before its body is read or
parsed. The comparison runs in constant time (hmac.compare_digest) so response timing does not
reveal how much of a guess was right. /health and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from edge_runtime.serving.server.errors import error_response

PROTECTED_PREFIX = "/v1/"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode("utf-8")

    def _authorized(self, scope: Scope) -> tuple[bool, str]:
        header = dict(scope.get("headers") or ()).get(b"authorization")
        if header is None:
            return False, "missing API key: send it as 'Authorization: Bearer KEY'"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False, "malformed Authorization header: expected 'Bearer KEY'"
        if not hmac.compare_digest(token.strip(), self._expected):
            return False, "incorrect API key provided"
        return True, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            ok, reason = self._authorized(scope)
            if not ok:
                response = error_response(401, reason, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
