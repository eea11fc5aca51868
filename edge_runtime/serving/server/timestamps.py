"""Word timestamps over HTTP (`word_timestamps: true` on /v1/audio/speech, not an OpenAI field).

The request is synthesised whole with the model's own alignment (Runtime.synthesize_with_timings:
Piper's duration predictor), then answered as
  * JSON: {"audio": base64 of the requested format, "format", "sample_rate", "duration_s",
    "words": [{"word", "start", "end", "start_char", "end_char"}]}; offsets index the ORIGINAL input;
  * SSE (`stream_format: "sse"`): the usual `speech.audio.delta` events, then one
    `speech.audio.timestamps` event with the words, then `speech.audio.done` with usage.
Models without an alignment get a 400 naming the field.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edge_runtime.runtime import audio
from edge_runtime.serving.server.errors import APIError

DELTA_BYTES = 32 * 1024  # SSE delta size for the already-encoded file


def check_supported(runtime: Any) -> None:
    model = runtime.model
    if not getattr(model, "supports_word_timings", False):
        raise APIError(400, f"word_timestamps: {model.model_id} does not report word timings (the Piper voices "
                            "do: their duration predictor aligns every word); leave word_timestamps false",
                       param="word_timestamps", code="unsupported_word_timestamps")


def words_json(words: list[Any]) -> list[dict[str, Any]]:
    return [{"word": w.word, "start": round(w.start_s, 4), "end": round(w.end_s, 4),
             "start_char": w.start_char, "end_char": w.end_char} for w in words]


async def speak_with_timestamps(service: Any, req: Any, request: Request, voice_id: str | None,
                                settings: dict, start: float) -> Response:
    from edge_runtime.serving.server.speech import SSE_MEDIA_TYPE, sse_events, until_disconnect

    check_supported(service.runtime)
    text = req.input
    samples, rate, words = await until_disconnect(request, service.scheduler.call(
        lambda: service.runtime.synthesize_with_timings(text, voice=voice_id, **settings)))
    data = await run_in_threadpool(audio.encode, samples, rate, req.response_format)
    elapsed = time.perf_counter() - start
    service.metrics.observe_speech(stream=False, latency_s=elapsed, ttfa_s=elapsed, audio_s=len(samples) / rate,
                                   compute_s=elapsed)
    listed = words_json(words)
    if req.stream_format != "sse":
        return JSONResponse({"audio": base64.b64encode(data).decode("ascii"), "format": req.response_format,
                             "sample_rate": rate, "duration_s": round(len(samples) / rate, 4), "words": listed})
    tally = {"samples": len(samples), "finished": True}

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), DELTA_BYTES):
            yield data[i:i + DELTA_BYTES]

    return StreamingResponse(sse_events(pieces(), len(text), tally, rate, words=listed), media_type=SSE_MEDIA_TYPE,
                             headers={"X-Sample-Rate": str(rate), "Cache-Control": "no-cache"})
