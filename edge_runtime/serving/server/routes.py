"""HTTP endpoints. Thin: each parses its request, calls a service (speech.py, voice_store.py) and
shapes the answer; failures are APIErrors rendered by errors.py."""

from __future__ import annotations

import time
from typing import Any, Optional

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from edge_runtime.serving.server.schemas import ErrorBody, Health, ModelCard, ModelList, SpeechRequest, VoiceCard, VoiceDeleted, VoiceList

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422,
                                                                                   429, 500, 503, 504)}


def _state(request: Request) -> Any:
    return request.app.state


async def create_speech(body: SpeechRequest, request: Request) -> Response:
    return await _state(request).speech.speak(body, request)


def list_models(request: Request) -> ModelList:
    state = _state(request)
    model = state.runtime.model
    card = ModelCard(id=model.model_id, created=int(state.started_at), sample_rate=model.sample_rate,
                     voice_prompt=model.supports_voice_prompt, voices=state.voices.builtin(),
                     aliases=state.speech.aliases())
    return ModelList(data=[card])


async def upload_voice(request: Request, file: UploadFile = File(..., description="voice prompt audio"),
                       transcript: Optional[str] = Form(None, description="what the prompt says")) -> JSONResponse:
    store = _state(request).voices
    data = await file.read(store.max_upload_bytes + 1)
    card, created = await store.upload(data, file.content_type or "", transcript)
    return JSONResponse(card.model_dump(), status_code=201 if created else 200)


def list_voices(request: Request) -> VoiceList:
    return VoiceList(data=_state(request).voices.list())


def delete_voice(voice_id: str, request: Request) -> VoiceDeleted:
    _state(request).voices.delete(voice_id)
    return VoiceDeleted(id=voice_id)


def health(request: Request) -> JSONResponse:
    state = _state(request)
    scheduler = state.scheduler
    kept = getattr(state.runtime, "model_state", None)  # idle unload (runtime.keep_alive_s); fakes lack it
    body = Health(status="draining" if state.draining else "ok", model=state.runtime.model.model_id,
                  profile=state.runtime.profile.name, queue_depth=scheduler.depth,
                  max_batch=scheduler.max_batch, uptime_s=round(time.time() - state.started_at, 3),
                  model_state=kept["state"] if kept else None, keep_alive=kept)
    if state.draining:  # a balancer's probe takes this server out; clients may retry elsewhere
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(body.model_dump(exclude_none=True))


def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def build_router() -> APIRouter:
    router = APIRouter()
    v1 = dict(responses=ERRORS)
    router.add_api_route("/v1/audio/speech", create_speech, methods=["POST"], tags=["audio"],
                         summary="Text to speech (OpenAI-compatible)", response_class=Response,
                         **v1)
    router.add_api_route("/v1/models", list_models, methods=["GET"], tags=["models"], response_model=ModelList,
                         **v1)
    router.add_api_route("/v1/voices", upload_voice, methods=["POST"], tags=["voices"],
                         summary="Upload a voice prompt; returns its id (a content hash)",
                         response_model=VoiceCard, status_code=201, responses=ERRORS)
    router.add_api_route("/v1/voices", list_voices, methods=["GET"], tags=["voices"], response_model=VoiceList,
                         **v1)
    router.add_api_route("/v1/voices/{voice_id}", delete_voice, methods=["DELETE"], tags=["voices"],
                         response_model=VoiceDeleted, **v1)
    router.add_api_route("/health", health, methods=["GET"], tags=["ops"], response_model=Health)
    router.add_api_route("/metrics", metrics, methods=["GET"], tags=["ops"], response_class=Response)
    return router

