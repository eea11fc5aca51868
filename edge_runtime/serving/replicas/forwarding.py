"""An HTTP request carried from the ingress to a model replica, and its answer carried back.

The ingress sends a `Forwarded` (method, path, headers, the whole body); the replica plays it into
our FastAPI app as an ASGI server would and yields the answer as it is produced: first
(status, headers, first chunk, complete), then the other body chunks. Ray streams the items (handle.options(stream=True)), so
streamed audio and SSE events leave the replica as soon as the app writes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edge_runtime.serving.replicas")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Forwarded:
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None


def _scope(req: Forwarded) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "query_string": req.query, "root_path": "", "headers": req.headers, "client": req.client,
            "server": ("127.0.0.1", 0), "state": {}}


def _set_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


async def play(app: Callable, req: Forwarded, *, extra_headers: Headers = (),
               rewrite_json: Callable[[dict], dict] | None = None) -> AsyncIterator[Any]:
    """Run `req` through the ASGI `app`; yields (status, headers, first body chunk, complete), then
    the other body chunks (bytes).

    `rewrite_json`, when given, edits a JSON object answer (the whole body is gathered first).
    Leaving early (the ingress's client went away, Ray cancelled us) tells the app the client
    disconnected, so the scheduler drops the request's queued work.
    """
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()  # speech.py watches for the disconnect while it waits for audio
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(_scope(req), receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))  # wakes the loop below if the app ends early
    started = finished = head_sent = False
    gathered: list[bytes] = []
    try:
        while not finished:
            message = await messages.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", ()))
                for name, value in extra_headers:
                    headers = _set_header(headers, name, value)
                started = True
                continue
            if message["type"] != "http.response.body":
                continue
            chunk, finished = message.get("body", b""), not message.get("more_body", False)
            if rewrite_json is not None:
                gathered.append(chunk)
            elif not head_sent:  # the head travels with the first chunk: one item less per answer
                head_sent = True
                yield status, headers, chunk, finished
            elif chunk:
                yield chunk
        if not started:  # the app ended without answering: its exception, if any, is the cause
            await task
            raise RuntimeError(f"{req.method} {req.path}: the app sent no answer")
        if rewrite_json is not None:
            body = b"".join(gathered)
            try:
                body = json.dumps(rewrite_json(json.loads(body))).encode()
            except (ValueError, TypeError, AttributeError):
                pass  # not a JSON object: sent as the app wrote it
            yield status, _set_header(headers, b"content-length", str(len(body)).encode()), body, True
        elif not head_sent:
            yield status, headers, b"", True
    finally:
        gone.set()
        if not task.done():  # the app sees the disconnect and unwinds; one still running later is cancelled
            asyncio.get_running_loop().call_later(5, task.cancel)
        elif not task.cancelled() and task.exception() is not None and started:
            # Starlette already answered 500 for it; keep the traceback in the replica's log
            log.error("%s %s failed", req.method, req.path, exc_info=task.exception())
