"""Request and response bodies (pydantic). Field names follow OpenAI's audio API so its clients
work unchanged; fields OpenAI sends that we cannot honour are accepted and ignored (instructions, for
models that cannot follow them)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")


# names the request's voice for layer-7 balancers, which hash on headers and never read the body
VOICE_HEADER = "X-Voice-Id"


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object: {"id": "..."}."""

    id: str = Field(min_length=1)


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="the served model's id, or tts-1 / tts-1-hd / gpt-4o-mini-tts")
    input: str = Field(description="text to speak (at most limits.max_text_chars characters)")
    voice: Union[str, VoiceRef] = Field(description="a built-in voice name or an uploaded voice id")
    response_format: str = Field("mp3", description="mp3, opus, aac, flac, wav or pcm (16-bit LE mono)")
    speed: float = Field(1.0, description="speaking rate, 0.25 to 4.0")
    stream_format: Optional[str] = Field(None, description="'audio' (raw bytes) or 'sse' (OpenAI's "
                                                            "speech.audio.delta / speech.audio.done events); "
                                                            "audio is sent while it is produced either way")
    instructions: Optional[str] = Field(None, description="how to speak (models that follow instructions, e.g. "
                                                          "CosyVoice2); other models ignore it")
    # not OpenAI's (its clients send it with extra_body): the same seed gives the same audio
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="fixes the sampling noise: same seed, same audio")
    # not OpenAI's: a JSON answer (audio + words), or a speech.audio.timestamps event on SSE
    word_timestamps: bool = Field(False, description="when each word is spoken, with offsets into input")

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: str) -> str:
        value = value.lower()
        if value not in RESPONSE_FORMATS:
            raise ValueError(f"unsupported response_format {value!r}; allowed: {', '.join(RESPONSE_FORMATS)}")
        return value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: float) -> float:
        if not 0.25 <= value <= 4.0:
            raise ValueError(f"speed {value:g} is out of range; allowed: 0.25 to 4.0")
        return value

    @field_validator("stream_format")
    @classmethod
    def _stream(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in STREAM_FORMATS:
            raise ValueError(f"unsupported stream_format {value!r}; allowed: {', '.join(STREAM_FORMATS)}")
        return value

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edge_runtime"
    sample_rate: int
    voice_prompt: bool
    voices: list[str]
    aliases: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    type: Literal["builtin", "uploaded"]
    model: str
    created: Optional[int] = None
    transcript: Optional[str] = None
    extra: dict[str, Any] = Field(default_factory=dict)


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceCard]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """What every failed request returns (see errors.py)."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    profile: str
    queue_depth: int
    max_batch: int
    uptime_s: float
    model_state: Optional[Literal["loaded", "unloading", "unloaded", "loading"]] = None  # runtime.keep_alive_s
    keep_alive: Optional[dict[str, Any]] = None
