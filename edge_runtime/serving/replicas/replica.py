"""A model replica: one Runtime and our whole FastAPI app (scheduler, worker, voices, metrics) in
one Ray Serve replica. The ingress forwards it HTTP requests (forwarding.py); nothing here knows
speech: the app answers as the plain server does, plus `X-Replica` on every answer and the
replica's id and pid in /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from ray import serve

from edge_runtime.serving.replicas.forwarding import Forwarded, play
from edge_runtime.serving.replicas.metrics_board import PUSH_EVERY_S, board

log = logging.getLogger("edge_runtime.serving.replicas")


def _cap_gpu_memory(fraction: float | None) -> None:
    """Ray's fractional GPUs are scheduling only: cap torch's allocator at this replica's share."""
    if fraction is None or fraction >= 1:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


class ModelReplica:
    async def __init__(self, model: str | None, profile: str | None, overrides: tuple[str, ...],
                       allow_download: bool, settings: dict[str, Any], memory_fraction: float | None) -> None:
        from edge_runtime.runtime.loader import load
        from edge_runtime.serving.server import ServerSettings, create_app

        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.lines: list[str] = []  # start-up lines, printed by the launcher
        _cap_gpu_memory(memory_fraction)
        # loading takes seconds: off the replica's event loop, which Ray's health checks share
        self.runtime = await asyncio.to_thread(load, model, profile=profile, overrides=tuple(overrides),
                                               allow_download=allow_download)
        self.app = create_app(self.runtime, ServerSettings(**settings, announce=self.lines.append))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # warm-up, scheduler and worker, as uvicorn's start-up does
        self._board = board(context.app_name)
        self._pusher = asyncio.ensure_future(self._push_metrics())
        self._header = [(b"x-replica", self.id.encode())]
        self._voices = self._voice_slots(self.runtime.profile.voice_cache.max_entries)

    def describe(self) -> dict[str, Any]:
        """What the launcher prints at start-up: the plain server's lines, from this replica."""
        from edge_runtime.serving.commands.serve import _plan_summary

        rt, kept = self.runtime, self.runtime.model_state
        lines = [f"profile: {rt.profile.name} ({rt.profile.source or 'built in'}): {rt.profile.description}",
                 f"model: {rt.model.model_id} ({rt.sample_rate} Hz)", _plan_summary(rt),
                 f"keep-alive: unload after {kept['keep_alive_s']:g} s idle" if kept["keep_alive_s"]
                 else "keep-alive: never unload",
                 "auth: API key required on /v1/*" if self.app.state.settings.key()
                 else "auth: none (set --api-key or $EDGE_RUNTIME_API_KEY to require one)", *self.lines]
        return {"id": self.id, "pid": os.getpid(), "lines": lines}

    def _voice_slots(self, slots: int):
        """Ray's model multiplexing keyed on the voice id, as many slots as the voice cache has
        entries. Registering a voice only tells Ray's router that the next request for it should
        come here; the voice itself is prepared (or found) by the runtime's voice cache on the
        request path, which counts the hit or miss."""
        async def register(voice_id: str) -> str:
            return voice_id

        return serve.multiplexed(max_num_models_per_replica=slots)(register)

    async def forward(self, req: Forwarded):
        voice_id = serve.get_multiplexed_model_id()
        if voice_id:
            await self._voices(voice_id)
        rewrite = self._with_replica if req.path == "/health" else None
        async for item in play(self.app, req, extra_headers=self._header, rewrite_json=rewrite):
            yield item

    def _with_replica(self, body: dict) -> dict:
        return {**body, "replica": {"id": self.id, "pid": os.getpid()}}

    async def _push_metrics(self) -> None:
        while True:
            await self._push()
            await asyncio.sleep(PUSH_EVERY_S)

    async def _push(self) -> None:
        try:
            await self._board.push.remote(self.id, self.app.state.metrics.render().decode())
        except Exception as exc:  # a lost board costs figures, never requests
            log.warning("metrics push failed: %s", exc)

    async def __del__(self) -> None:
        """Serve calls this once the replica's in-flight requests are done (or its grace ran out)."""
        self._pusher.cancel()
        with contextlib.suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)  # drains the scheduler, stops the worker
        await self._push()
        self.runtime.close()
