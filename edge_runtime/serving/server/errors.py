"""Every failure leaves the server as OpenAI's error JSON: {"error": {message, type, param, code}},
so OpenAI clients raise their usual exceptions (BadRequestError, RateLimitError, ...)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_runtime.errors import InvalidInputError, RequestFailedError
from edge_runtime.serving.scheduler import QueueFullError, SchedulerClosedError

log = logging.getLogger("edge_runtime.serving.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """A failure with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def as_api_error(exc: BaseException) -> APIError:
    """Map the runtime's and scheduler's exceptions to statuses (used by handlers and streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, SchedulerClosedError):
        return APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, TimeoutError):
        return APIError(504, f"request timed out: {exc or 'no result within limits.request_timeout_s'}",
                        code="timeout")
    if isinstance(exc, InvalidInputError):
        return APIError(400, str(exc), code="invalid_input")
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="request_failed")
    return APIError(500, f"internal error: {type(exc).__name__}; the server logged the details",
                    code="internal_error")


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """FastAPI's validation errors -> (message, param, code), naming the first bad field."""
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        where = [part for part in first.get("loc", ()) if isinstance(part, int)]
        at = f" at character {where[0]}" if where else ""
        return f"malformed JSON in request body{at}: {reason}", None, "invalid_json"
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = loc[0] if loc else None  # the top-level field, as OpenAI names it (not union branches)
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):  # our own validators' messages are complete sentences
        message = message[len("Value error, "):]
    elif param:
        message = f"{param}: {message}"
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        message = "request body must be a JSON object (Content-Type: application/json)"
    if first.get("type") == "missing":
        message = f"missing required field {param!r}" if param else "request body is missing"
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return message + extra, param, "invalid_" + (first.get("type") or "value").removesuffix("_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with its own shape; OpenAI answers 400 invalid_request_error
        message, param, code = _describe_validation(list(exc.errors()))
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 413:  # limits.py stopped reading the body
            return error_response(413, detail, code="body_too_large")
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        error = as_api_error(exc)
        if error.status >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(error.status, error.message, param=error.param, code=error.code,
                              headers=error.headers)

    # the known exceptions are answered here; anything else is a bug, answered by the last-resort
    # handler (Starlette then still logs its traceback)
    for known in (InvalidInputError, RequestFailedError, QueueFullError, SchedulerClosedError, TimeoutError,
                  Exception):
        app.add_exception_handler(known, _mapped)
