"""Voices the server knows: built-in names and uploaded prompts.

An upload is checked in order of cost — declared type, size, magic bytes, decode, then the model's
own preparation on the inference worker — and kept by its content hash in the runtime's voice cache
and in its voice library (safetensors, never pickle; a folder or fsspec URL that several servers may
share), so an id stays valid after a cache eviction, a restart, or on another replica. Ids are
content hashes, never paths.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from edge_runtime.errors import InvalidInputError
from edge_runtime.runtime.prompts import decode
from edge_runtime.runtime.voices import check_voice_id
from edge_runtime.serving.server.errors import APIError
from edge_runtime.serving.server.schemas import VoiceCard

# OpenAI's voice names: existing clients send them; a model without named speakers maps them all
# to its default speaker
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
                 "sage", "shimmer", "verse")
AUDIO_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/flac", "audio/x-flac",
               "audio/ogg", "application/ogg", "audio/mpeg", "audio/mp3", "audio/x-mpeg", "audio/aiff",
               "audio/x-aiff"}
GENERIC_TYPES = {"application/octet-stream", ""}  # curl -F and many clients send these: sniff instead


def sniff(data: bytes) -> str | None:
    """The container named by the first bytes, or None when they belong to no audio we read."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def _timestamp(text: str | None) -> int | None:
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) if text else None
    except ValueError:
        return None


class VoiceStore:
    def __init__(self, runtime: Any, scheduler: Any, max_upload_bytes: int) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.max_upload_bytes = max_upload_bytes
        self.model_id = runtime.model.model_id
        self.library = runtime.voice_library()
        self.speakers = list(runtime.model.speakers())

    # -- names --------------------------------------------------------------------------------
    def builtin(self) -> list[str]:
        return [*self.speakers, *OPENAI_VOICES]

    def resolve(self, name: str) -> tuple[str | None, str | None]:
        """A request's voice -> (uploaded voice id, speaker name); APIError 400 when unknown."""
        if name in self.speakers:
            return None, name
        if name.lower() in OPENAI_VOICES:
            return None, None  # the model's default speaker
        try:
            check_voice_id(name)
        except ValueError:
            shown = ", ".join(self.builtin()[:30])
            raise APIError(400, f"unknown voice {name!r}; built-in voices: {shown}; or upload a voice prompt "
                                "with POST /v1/voices and use its id", param="voice", code="unknown_voice")
        if not self.exists(name):
            raise APIError(400, f"unknown voice id {name!r}: no uploaded voice has this id (GET /v1/voices "
                                "lists them)", param="voice", code="unknown_voice")
        return name, None

    def exists(self, voice_id: str) -> bool:
        return voice_id in self.runtime.voice_cache or voice_id in self.library

    # -- upload -------------------------------------------------------------------------------
    def _check_upload(self, data: bytes, content_type: str) -> None:
        declared = content_type.split(";")[0].strip().lower()
        if declared not in AUDIO_TYPES and declared not in GENERIC_TYPES:
            raise APIError(415, f"file has content type {declared!r}, not audio; send WAV, FLAC, OGG or MP3",
                           param="file", code="unsupported_media_type")
        if len(data) > self.max_upload_bytes:
            raise APIError(413, f"file is over the upload limit of {self.max_upload_bytes} bytes",
                           param="file", code="file_too_large")
        if not data:
            raise APIError(400, "file is empty (0 bytes)", param="file", code="empty_file")
        if sniff(data[:16]) is None:
            raise APIError(415, "file is not audio (its first bytes match no WAV, FLAC, OGG, AIFF or MP3 "
                                "header)", param="file", code="unsupported_media_type")

    async def upload(self, data: bytes, content_type: str, transcript: str | None) -> tuple[VoiceCard, bool]:
        """Prompt audio -> (its card, True when new). The id is the content hash of the prompt."""
        if not self.runtime.model.supports_voice_prompt:
            raise APIError(400, f"{self.model_id} does not take voice prompts", code="voice_prompt_unsupported")
        self._check_upload(data, content_type)
        limit = self.runtime.profile.limits.max_text_chars
        if transcript is not None and len(transcript) > limit:
            raise APIError(400, f"transcript is {len(transcript)} characters; at most {limit}",
                           param="transcript", code="transcript_too_long")
        try:
            samples, rate = await run_in_threadpool(decode, data, "file")
        except InvalidInputError as exc:
            raise APIError(400, f"{exc}; the file may be corrupt", param="file", code="corrupt_audio") from None
        rt = self.runtime

        def add() -> tuple[str, bool]:  # prepares, then keeps it (with its source) in the shared library
            return rt.add_voice(samples, sample_rate=rate, transcript=transcript or None)

        try:
            voice_id, created = await self.scheduler.call(add)
        except InvalidInputError as exc:  # decoded, but unusable: NaN, silent, too long, too short
            raise APIError(422, str(exc).replace("voice prompt", "uploaded audio", 1), param="file",
                           code="unusable_audio") from None
        return self.card(voice_id), created

    # -- listing ------------------------------------------------------------------------------
    def card(self, voice_id: str) -> VoiceCard:
        try:
            meta = self.library.metadata(voice_id)
        except FileNotFoundError:
            meta = {}
        return VoiceCard(id=voice_id, type="uploaded", model=meta.get("model_id", self.model_id),
                         created=_timestamp(meta.get("created")), transcript=meta.get("transcript"),
                         extra=meta.get("extra") or {})

    def list(self) -> list[VoiceCard]:
        cards = [VoiceCard(id=name, type="builtin", model=self.model_id) for name in self.builtin()]
        for voice_id in self.library.list():
            try:
                card = self.card(voice_id)
            except (OSError, ValueError):  # removed or damaged meanwhile
                continue
            if card.model == self.model_id:
                cards.append(card)
        return cards

    def delete(self, voice_id: str) -> None:
        try:
            check_voice_id(voice_id)
        except ValueError:
            raise APIError(404, f"no voice with id {voice_id!r} (ids are 16-64 lowercase hex characters)",
                           param="voice_id", code="voice_not_found") from None
        in_cache = self.runtime.voice_cache.remove(voice_id)
        on_disk = self.library.delete(voice_id)
        if not (in_cache or on_disk):
            raise APIError(404, f"no voice with id {voice_id!r}", param="voice_id", code="voice_not_found")
