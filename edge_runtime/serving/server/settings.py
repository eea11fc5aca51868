"""Server settings: what the profile does not say (API key, upload limits) plus overrides of the
profile's batching and limits sections. None means "take the profile's value"."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger("edge_runtime.serving.server")

API_KEY_ENV = "EDGE_RUNTIME_API_KEY"


@dataclass
class ServerSettings:
    api_key: str | None = None  # None: read $EDGE_RUNTIME_API_KEY; "" or unset there: no auth
    max_upload_bytes: int = 10 * 1024 * 1024  # a 20 s WAV at 48 kHz 16-bit stereo is ~3.7 MiB
    max_json_bytes: int = 1024 * 1024  # 4000 characters of text need far less
    max_batch: int | str | None = None
    max_wait_ms: float | None = None
    queue_size: int | None = None
    request_timeout_s: float | None = None
    shutdown_timeout_s: float = 30.0  # how long SIGTERM waits for queued and running requests
    warm_up: bool = True  # one synthesis before the first request (so it is not slower than the rest)
    announce: Callable[[str], None] = field(default=log.info)  # startup lines (serve prints them)

    def key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        if key and not (key.isascii() and key.isprintable() and " " not in key):
            # HTTP clients send headers as ASCII: any other key could never match
            raise EdgeRuntimeError("the API key must be printable ASCII without spaces")
        return key or None

    def resolved(self, profile: Any) -> dict[str, Any]:
        """Batching and queue limits: these settings where given, else the profile's."""
        pick = lambda mine, theirs: theirs if mine is None else mine  # noqa: E731
        return {"max_batch": pick(self.max_batch, profile.batching.max_batch),
                "max_wait_ms": pick(self.max_wait_ms, profile.batching.max_wait_ms),
                "queue_size": pick(self.queue_size, profile.limits.queue_size),
                "request_timeout_s": pick(self.request_timeout_s, profile.limits.request_timeout_s)}
