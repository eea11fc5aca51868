"""Speech requests: validate against the served model, queue on the scheduler, encode or stream.

Streaming (wav and pcm always, since both can be sent as they are produced): the first chunk is
awaited before the response starts, so a request that fails before any audio still gets a proper
error status; after that a WAV header with an open length and 16-bit PCM follow chunk by chunk.
mp3, flac and opus are encoded once the audio is complete (their encoders rewrite headers at the
end, so a streamed file would not decode everywhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.runtime import audio
from edge_runtime.serving.server.errors import APIError, as_api_error
from edge_runtime.serving.server.schemas import SpeechRequest

log = logging.getLogger("edge_runtime.serving.server")
T = TypeVar("T")

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # existing clients send these: the served model
STREAMED_FORMATS = ("wav", "pcm")


class ClientGone(APIError):
    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client goes away first (its queued work is dropped)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled (server shutting down)
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if not work.done():  # the client left first
        work.cancel()
        raise ClientGone()
    return work.result()


class SpeechService:
    def __init__(self, runtime: Any, scheduler: Any, voices: Any, metrics: Any) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.voices = voices
        self.metrics = metrics
        self.model_id = runtime.model.model_id

    def aliases(self) -> list[str]:
        short = self.model_id.split(":", 1)[1] if ":" in self.model_id else None
        return [name for name in (short, *OPENAI_MODELS) if name]

    def _check(self, req: SpeechRequest) -> tuple[str | None, dict[str, Any]]:
        if req.model != self.model_id and req.model not in self.aliases():
            raise APIError(404, f"model {req.model!r} is not served here; available: {self.model_id} "
                                f"(aliases: {', '.join(self.aliases())})", param="model", code="model_not_found")
        if not req.input.strip():
            raise APIError(400, "input is empty: give at least one word to speak", param="input",
                           code="empty_input")
        limit = self.runtime.profile.limits.max_text_chars
        if len(req.input) > limit:
            raise APIError(400, f"input is {len(req.input)} characters; at most {limit} allowed "
                                "(limits.max_text_chars)", param="input", code="input_too_long")
        voice_id, speaker = self.voices.resolve(req.voice_name)
        settings: dict[str, Any] = {"speed": req.speed}
        if speaker is not None:
            settings["speaker"] = speaker
        if req.instructions is not None:
            settings["instructions"] = req.instructions
        if req.seed is not None:
            settings["seed"] = req.seed
        return voice_id, settings

    async def speak(self, req: SpeechRequest, request: Request) -> Response:
        start = time.perf_counter()
        voice_id, settings = self._check(req)
        stream = req.response_format in STREAMED_FORMATS
        try:
            if stream:
                return await self._stream(req, request, voice_id, settings, start)
            return await self._whole(req, request, voice_id, settings, start)
        except Exception as exc:
            self._rejected(as_api_error(exc))
            raise

    def _rejected(self, error: APIError) -> None:
        reason = {429: "queue_full", 499: "disconnected", 503: "shutting_down", 504: "timeout"}.get(error.status)
        if reason:
            self.metrics.rejected.labels(reason=reason).inc()

    async def _whole(self, req: SpeechRequest, request: Request, voice_id: str | None, settings: dict,
                     start: float) -> Response:
        result = await until_disconnect(request, self.scheduler.synthesize(req.input, voice_id, **settings))
        data = await run_in_threadpool(audio.encode, result.audio, result.sample_rate, req.response_format)
        elapsed = time.perf_counter() - start
        self.metrics.observe_speech(stream=False, latency_s=elapsed, ttfa_s=elapsed,
                                    audio_s=len(result.audio) / result.sample_rate, compute_s=result.compute_s)
        return Response(data, media_type=audio.MEDIA_TYPES[req.response_format],
                        headers={"X-Sample-Rate": str(result.sample_rate), "X-Batch-Size": str(result.batch_size),
                                 "X-Queue-Seconds": f"{result.queued_s:.3f}",
                                 "X-Compute-Seconds": f"{result.compute_s:.3f}"})

    async def _stream(self, req: SpeechRequest, request: Request, voice_id: str | None, settings: dict,
                      start: float) -> Response:
        chunks = self.scheduler.stream(req.input, voice_id, **settings)
        try:  # bad input and timeouts before any audio still get their status
            first = await until_disconnect(request, chunks.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        ttfa = time.perf_counter() - start
        rate = self.runtime.sample_rate
        body = self._body(chunks, first, req.response_format, rate, start, ttfa)
        return StreamingResponse(body, media_type=audio.MEDIA_TYPES[req.response_format],
                                 headers={"X-Sample-Rate": str(rate)})

    async def _body(self, chunks: Any, first: Any, fmt: str, rate: int, start: float,
                    ttfa: float) -> AsyncIterator[bytes]:
        samples, outcome = 0, "disconnected"
        try:
            if fmt == "wav":
                yield audio.wav_stream_header(rate)
            if first is not None:
                samples += len(first)
                yield audio.to_pcm16(first)
                async for chunk in chunks:
                    samples += len(chunk)
                    yield audio.to_pcm16(chunk)
            outcome = "finished"
        except Exception as exc:  # noqa: BLE001 - headers are sent: end the stream early, say why in the log
            error = as_api_error(exc)
            self._rejected(error)
            outcome = "failed"
            log.warning("stream ended early after %.2f s of audio: %s", samples / rate, error.message)
        finally:
            await chunks.aclose()  # a disconnect lands here too: the worker stops at its next chunk
            if outcome == "finished":
                self.metrics.observe_speech(stream=True, latency_s=time.perf_counter() - start, ttfa_s=ttfa,
                                            audio_s=samples / rate, compute_s=chunks.compute_s)
            elif outcome == "disconnected":
                self.metrics.rejected.labels(reason="disconnected").inc()
