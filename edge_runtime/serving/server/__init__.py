"""OpenAI-compatible HTTP server (FastAPI): `create_app(runtime, settings)`; run it with
`edge-runtime serve`. Needs the `server` extra (fastapi, uvicorn, prometheus-client, python-multipart)."""

from edge_runtime.serving.server.app import create_app
from edge_runtime.serving.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
