"""Speech requests: validate against the served model, queue on the scheduler, encode or stream.

Streaming (every format but flac): the first chunk is awaited before the response starts, so a
request that fails before any audio still gets a proper error status; after that the audio follows
chunk by chunk. wav and pcm are 16-bit PCM as produced; mp3, opus and aac go through a PyAV encoder
fed chunk by chunk, and the container bytes leave as soon as the muxer writes them
(runtime/audio_stream.py). flac is encoded once the audio is complete.

WAV header: when the model knows the request's whole length before decoding (Piper: its duration
predictor, run for every sentence first, exact because the request's seed fixes the noise; a
request without a seed gets a random one here), the header carries the true RIFF/data sizes, so
strict readers (Python's `wave`) read the right duration; otherwise 0xFFFFFFFF, as OpenAI sends.

`stream_format: "sse"` wraps the same bytes as OpenAI does: `speech.audio.delta` events with base64
audio, then one `speech.audio.done` event with `usage`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.runtime import audio, audio_stream
from edge_runtime.serving.server.errors import APIError, as_api_error
from edge_runtime.runtime.voices import is_voice_id
from edge_runtime.serving.server.schemas import VOICE_HEADER, SpeechRequest

log = logging.getLogger("edge_runtime.serving.server")
T = TypeVar("T")

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # existing clients send these: the served model
RAW_FORMATS = ("wav", "pcm")  # 16-bit PCM as produced
ENCODED_FORMATS = ("mp3", "opus", "aac")  # PyAV, frame by frame
# usage.output_tokens counts 20 ms audio frames (50 per second of audio), whatever the model's own
# frame rate; usage.input_tokens counts the input's characters (no tokenizer is shared by every family)
OUTPUT_TOKENS_PER_SECOND = 50
SSE_MEDIA_TYPE = "text/event-stream"


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

    @staticmethod
    def _voice(req: SpeechRequest, request: Request) -> str:
        """The body's voice, or the X-Voice-Id header's: a layer-7 balancer hashes on that header to
        send every request for one voice to the server that has it cached."""
        header = request.headers.get(VOICE_HEADER, "").strip()
        if not header:
            return req.voice_name
        if is_voice_id(req.voice_name) and req.voice_name != header:
            raise APIError(400, f"the {VOICE_HEADER} header ({header!r}) and the body's voice "
                                f"({req.voice_name!r}) name different voices; send one, or the same id in both",
                           param="voice", code="conflicting_voice")
        return header

    def _check(self, req: SpeechRequest, voice_name: str) -> tuple[str | None, dict[str, Any]]:
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
        voice_id, speaker = self.voices.resolve(voice_name)
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
        voice_id, settings = self._check(req, self._voice(req, request))
        fmt = req.response_format
        stream = fmt in RAW_FORMATS or (fmt in ENCODED_FORMATS and audio_stream.available())
        try:
            if req.word_timestamps:
                from edge_runtime.serving.server.timestamps import speak_with_timestamps

                return await speak_with_timestamps(self, req, request, voice_id, settings, start)
            if stream:
                return await self._stream(req, request, voice_id, settings, start)
            if req.stream_format == "sse":  # flac: one delta carrying the whole file
                return await self._whole_sse(req, request, voice_id, settings, start)
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
        result, data = await self._encoded(req, request, voice_id, settings, start)
        return Response(data, media_type=audio.MEDIA_TYPES[req.response_format],
                        headers={"X-Sample-Rate": str(result.sample_rate), "X-Batch-Size": str(result.batch_size),
                                 "X-Queue-Seconds": f"{result.queued_s:.3f}",
                                 "X-Compute-Seconds": f"{result.compute_s:.3f}"})

    async def _encoded(self, req: SpeechRequest, request: Request, voice_id: str | None, settings: dict,
                       start: float) -> tuple[Any, bytes]:
        result = await until_disconnect(request, self.scheduler.synthesize(req.input, voice_id, **settings))
        data = await run_in_threadpool(audio.encode, result.audio, result.sample_rate, req.response_format)
        elapsed = time.perf_counter() - start
        self.metrics.observe_speech(stream=False, latency_s=elapsed, ttfa_s=elapsed,
                                    audio_s=len(result.audio) / result.sample_rate, compute_s=result.compute_s)
        return result, data

    async def _whole_sse(self, req: SpeechRequest, request: Request, voice_id: str | None, settings: dict,
                         start: float) -> Response:
        result, data = await self._encoded(req, request, voice_id, settings, start)
        tally = {"samples": len(result.audio), "finished": True}

        async def one() -> AsyncIterator[bytes]:
            yield data

        return StreamingResponse(sse_events(one(), len(req.input), tally, result.sample_rate),
                                 media_type=SSE_MEDIA_TYPE, headers={"X-Sample-Rate": str(result.sample_rate),
                                                                     "Cache-Control": "no-cache"})

    async def _known_length(self, req: SpeechRequest, request: Request, voice_id: str | None,
                            settings: dict) -> tuple[int | None, dict]:
        """(samples the stream will carry, settings to stream with) when the model can tell up front:
        its durations for every sentence, run on the inference worker before the stream is queued."""
        if not hasattr(self.runtime.model, "predict_samples") or not hasattr(self.runtime, "audio_length"):
            return None, settings
        if settings.get("seed") is None:  # durations are sampled: fix this request's noise so the
            settings = {**settings, "seed": secrets.randbits(63)}  # prediction is what the stream makes
        text = req.input
        samples = await until_disconnect(request, self.scheduler.call(
            lambda: self.runtime.audio_length(text, voice=voice_id, **settings)))
        return samples, settings

    async def _stream(self, req: SpeechRequest, request: Request, voice_id: str | None, settings: dict,
                      start: float) -> Response:
        fmt = req.response_format
        rate = self.runtime.sample_rate
        total = None
        if fmt == "wav":
            total, settings = await self._known_length(req, request, voice_id, settings)
        encoder = audio_stream.StreamEncoder(fmt, rate) if fmt in ENCODED_FORMATS else None
        chunks = self.scheduler.stream(req.input, voice_id, **settings)
        try:  # bad input and timeouts before any audio still get their status
            first = await until_disconnect(request, chunks.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            if encoder is not None:
                encoder.abort()
            raise
        ttfa = time.perf_counter() - start
        tally = {"samples": 0, "finished": False}
        body = self._body(chunks, first, fmt, rate, start, ttfa, encoder, total, tally)
        headers = {"X-Sample-Rate": str(rate)}
        if req.stream_format == "sse":
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(sse_events(body, len(req.input), tally, rate), media_type=SSE_MEDIA_TYPE,
                                     headers=headers)
        return StreamingResponse(body, media_type=audio.MEDIA_TYPES[fmt], headers=headers)

    async def _body(self, chunks: Any, first: Any, fmt: str, rate: int, start: float, ttfa: float,
                    encoder: Any, total: int | None, tally: dict) -> AsyncIterator[bytes]:
        samples, outcome = 0, "disconnected"
        try:
            if fmt == "wav":
                yield audio.wav_stream_header(rate, samples=total)
            if first is not None:
                async for chunk in _prepend(first, chunks):
                    samples += len(chunk)
                    # mp3/opus/aac cost ~11-14 ms per second of audio here (1-3 ms for a first chunk):
                    # off the event loop, so other requests' bytes keep flowing
                    data = (await run_in_threadpool(encoder.feed, chunk) if encoder is not None
                            else audio.to_pcm16(chunk))
                    if data:
                        yield data
            if encoder is not None:
                tail = await run_in_threadpool(encoder.close)
                if tail:
                    yield tail
            outcome = "finished"
            if total is not None and samples != total:
                log.warning("WAV header said %d samples but the stream carried %d", total, samples)
        except Exception as exc:  # noqa: BLE001 - headers are sent: end the stream early, say why in the log
            error = as_api_error(exc)
            self._rejected(error)
            outcome = "failed"
            log.warning("stream ended early after %.2f s of audio: %s", samples / rate, error.message)
        finally:
            tally["samples"], tally["finished"] = samples, outcome == "finished"
            if encoder is not None and outcome != "finished":
                encoder.abort()
            await chunks.aclose()  # a disconnect lands here too: the worker stops at its next chunk
            if outcome == "finished":
                self.metrics.observe_speech(stream=True, latency_s=time.perf_counter() - start, ttfa_s=ttfa,
                                            audio_s=samples / rate, compute_s=chunks.compute_s)
            elif outcome == "disconnected":
                self.metrics.rejected.labels(reason="disconnected").inc()


async def _prepend(first: Any, rest: Any) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def sse_events(body: AsyncIterator[bytes], input_tokens: int, tally: dict,
                     rate: int, words: list[dict] | None = None) -> AsyncIterator[bytes]:
    """OpenAI's speech SSE: one `speech.audio.delta` per piece of audio bytes (base64), then
    `speech.audio.done` with usage once the audio is complete (not after a failure: the stream
    just ends, as a truncated raw stream would). With ``words`` (word_timestamps, ours) one
    `speech.audio.timestamps` event comes before the done event."""
    try:
        async for data in body:
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
        if tally["finished"] and words is not None:
            yield _event({"type": "speech.audio.timestamps", "words": words})
        if tally["finished"]:
            output_tokens = math.ceil(tally["samples"] * OUTPUT_TOKENS_PER_SECOND / rate)
            yield _event({"type": "speech.audio.done",
                          "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                                    "total_tokens": input_tokens + output_tokens}})
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
