"""Runtime: one loaded model driven by a resolved profile.

It owns the model adapter, the memory governor, the voice cache and the telemetry log; every
forward runs under `torch.inference_mode()`. Serving layers talk to the model only through here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from functools import partial
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, RequestFailedError
from edge_runtime.runtime.idle import HeldIterator, KeepAlive, ModelFacts, can_reload, release_memory, reload_parts
from edge_runtime.runtime.memory import MemoryGovernor, is_oom_error
from edge_runtime.models.base import SpeechModel, SynthesisSettings, WordTiming
from edge_runtime.paths import data_dir
from edge_runtime.runtime.prompts import prepare_prompt
from edge_runtime.runtime.telemetry import RequestTelemetry, TelemetryLog
from edge_runtime.runtime.voices import PreparedVoice, VoiceCache, VoiceLibrary, voice_key
from edge_runtime.runtime.voices.keys import is_voice_id
from edge_runtime.runtime.voices.library import VoiceSource
from edge_runtime.runtime.voices.resolver import VoiceResolver

log = logging.getLogger(__name__)


def configure_threads(threads: int) -> int:
    """Intra-op threads: the profile's value, or every physical core when it says 0."""
    if threads <= 0:
        import psutil

        threads = psutil.cpu_count(logical=False) or torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


class Runtime:
    """Synthesises speech with one model under one profile; safe to call from several threads."""

    def __init__(self, model: SpeechModel, profile: Any, *, telemetry_path: str | None = None,
                 device: str = "cpu", dtype: Any = None, plan: Any = None, placement: Any = None,
                 reloader: Callable[[], tuple[SpeechModel, Any]] | None = None) -> None:
        self.model = model
        self.profile = profile
        self.plan = plan  # the planner's Plan this model was loaded under (None: not planned)
        self.placement_handle = placement  # what the backends hold (stats, end_request, close)
        self.device = device
        self.dtype = dtype  # the dtype policy's choice (DtypeChoice), for reports
        self.threads = configure_threads(profile.runtime.threads)
        self.governor = MemoryGovernor(profile.cleanup, device=device)  # values checked by the schema
        cache = profile.voice_cache
        self.voice_cache = VoiceCache(cache.max_entries, cache.max_mib * 1024 * 1024, device=cache.device)
        self.voices = VoiceResolver(self.voice_cache, self._open_library, model.model_id, self._prepare_clean,
                                    recheck_s=cache.library_recheck_s)
        self.telemetry = TelemetryLog(telemetry_path)
        self._lock = threading.Lock()  # one forward at a time: the model's cores are shared
        self.inference_mode = True  # False only to measure the cost of autograd (soak's baseline)
        # Everything alive now (torch, the model) is permanent: later full collections skip it,
        # which makes per-request cleanup cost ~0.01 ms instead of ~50 ms.
        MemoryGovernor.freeze_baseline()
        # runtime.keep_alive_s: unload after that long idle, reload on the next request (idle.py).
        # Reloading needs to know how: the loader's plan (reload_parts) or the caller's reloader.
        seconds = getattr(profile.runtime, "keep_alive_s", None)
        self._reloader = reloader
        if seconds and reloader is None:
            why = "it was not built by the loader" if plan is None else can_reload(model.model_id)
            if why:
                log.warning("runtime.keep_alive_s ignored: %s cannot be reloaded (%s); it stays loaded",
                            model.model_id, why)
            else:
                self._reloader = partial(reload_parts, self)
        self._placement_facts: dict[str, Any] | None = None
        self.keep_alive = KeepAlive(seconds, self._unload_model, self._reload_model,
                                    enabled=self._reloader is not None, name=model.model_id)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    # -- validation -------------------------------------------------------------------------
    def _check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("text is empty: give at least one word to speak")
        limit = self.profile.limits.max_text_chars
        if len(text) > limit:
            raise InvalidInputError(
                f"text is {len(text)} characters; profile {self.profile.name!r} allows at most {limit} "
                f"(limits.max_text_chars; raise it with --set limits.max_text_chars=N)")
        return text

    def _settings(self, **kwargs: Any) -> SynthesisSettings:
        speed = kwargs.get("speed", 1.0)
        if not (isinstance(speed, (int, float)) and 0.25 <= float(speed) <= 4.0):
            raise InvalidInputError(f"speed {speed!r} is out of range; allowed: 0.25 to 4.0")
        for name in ("noise_scale", "noise_w"):
            value = kwargs.get(name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 2.0):
                raise InvalidInputError(f"{name} {value!r} is out of range; allowed: 0.0 to 2.0")
        instructions = kwargs.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str) or len(instructions) > self.profile.limits.max_text_chars:
                raise InvalidInputError(f"instructions must be text of at most {self.profile.limits.max_text_chars} "
                                        "characters (limits.max_text_chars)")
            # OpenAI clients send instructions to every model: a family that cannot follow them
            # speaks the text as usual, as OpenAI's tts-1 does.
            if not instructions.strip() or not self.model.supports_instructions:
                kwargs["instructions"] = None
        settings = SynthesisSettings(**kwargs)
        self.model.check_settings(settings)
        return settings

    # -- voice prompts ----------------------------------------------------------------------
    def prepare_voice(self, audio: Any, sample_rate: int | None = None,
                      transcript: str | None = None) -> tuple[str, PreparedVoice, bool]:
        """Prompt audio (bytes, a path, or samples with `sample_rate`) -> (voice id, prepared voice,
        cache hit). The id is a content hash: the same clip again is a cache hit, never re-encoded."""
        with self.keep_alive.hold():
            return self._prepare_voice(audio, sample_rate, transcript)

    def _prompt(self, audio: Any, sample_rate: int | None, transcript: str | None) -> tuple[str, VoiceSource]:
        """(voice id, the clean prompt the model prepares): cheap checks before any model work."""
        if not self.model.supports_voice_prompt:
            raise InvalidInputError(f"{self.model.model_id} does not take voice prompts")
        rate = self.model.prompt_sample_rate or self.model.sample_rate
        clean = prepare_prompt(audio, rate, self.profile.limits.max_prompt_seconds, sample_rate=sample_rate)
        key = voice_key(clean, rate, self.model.model_id, transcript)
        return key, VoiceSource(samples=clean, sample_rate=rate, model_id=self.model.model_id, transcript=transcript)

    def _prepare_clean(self, clean: np.ndarray, rate: int, transcript: str | None) -> PreparedVoice:
        with torch.inference_mode():
            return self.model.prepare_voice(clean, rate, transcript)

    def _prepare_voice(self, audio: Any, sample_rate: int | None = None,
                       transcript: str | None = None) -> tuple[str, PreparedVoice, bool]:
        key, source = self._prompt(audio, sample_rate, transcript)
        voice, hit = self.voice_cache.get_or_prepare(
            key, lambda: self._prepare_clean(source.samples, source.sample_rate, transcript))
        return key, voice, hit

    def add_voice(self, audio: Any, sample_rate: int | None = None,
                  transcript: str | None = None) -> tuple[str, bool]:
        """Prepare a prompt and keep it in the voice library with its source, so every server
        sharing the library can use (and, if damaged, rebuild) it -> (voice id, True when new)."""
        with self.keep_alive.hold():
            key, source = self._prompt(audio, sample_rate, transcript)
            voice, _ = self.voice_cache.get_or_prepare(
                key, lambda: self._prepare_clean(source.samples, source.sample_rate, transcript))
            return key, self.voices.keep(key, voice, source)

    def _resolve_voice(self, voice: Any) -> tuple[PreparedVoice | None, str]:
        """None, a PreparedVoice, a voice id from prepare_voice, or prompt audio -> (voice, cache status)."""
        if voice is None:
            return None, "none"
        if isinstance(voice, PreparedVoice):
            return voice, "none"
        if isinstance(voice, tuple) and len(voice) == 2:  # (samples, sample_rate)
            _, prepared, hit = self.prepare_voice(voice[0], voice[1])
            return prepared, "hit" if hit else "miss"
        if isinstance(voice, str) and is_voice_id(voice):
            hit = voice in self.voice_cache
            try:
                found = self.voices.lookup(voice)
            except ValueError as exc:  # damaged beyond repair, or prepared for another model
                raise InvalidInputError(str(exc)) from None
            if found is None:
                raise InvalidInputError(f"unknown voice id {voice!r}: prepare it first (it may have been "
                                        f"evicted; the cache keeps {self.voice_cache.max_entries} voices; "
                                        "save_voice() or add_voice() keeps one in the voice library)")
            return found, "hit" if hit else "library"
        _, prepared, hit = self.prepare_voice(voice)
        return prepared, "hit" if hit else "miss"

    def _open_library(self) -> VoiceLibrary:
        root = self.profile.voice_cache.library_dir
        try:
            return VoiceLibrary(root or data_dir() / "prepared_voices")
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"voice library {root!r} (voice_cache.library_dir) cannot be opened: {exc}") from None

    def voice_library(self) -> VoiceLibrary:
        """The voice library this runtime reads and writes (voice_cache.library_dir)."""
        return self.voices.library

    def save_voice(self, voice_id: str) -> str:
        """Keep a prepared voice in the library so it survives restarts (safetensors, no pickle).
        Prefer add_voice(), which also keeps the prompt it was prepared from."""
        voice = self.voice_cache.get(voice_id)
        if voice is None:
            raise InvalidInputError(f"voice {voice_id!r} is not prepared in this runtime")
        library = self.voice_library()
        library.save(voice_id, voice)
        return library.where(voice_id)

    # -- synthesis --------------------------------------------------------------------------
    def _request(self, text: str, voice: Any, settings: dict) -> tuple[list[str], SynthesisSettings, Any, str]:
        """Validate everything before any compute, so a bad request never reaches the model."""
        text = self._check_text(text)
        opts = self._settings(**settings)
        units = self.model.split_text(text)
        if not units:
            raise InvalidInputError("text has nothing speakable after normalisation")
        prepared, status = self._resolve_voice(voice)
        return units, opts, prepared, status

    def stream(self, text: str, *, voice: Any = None, **settings: Any) -> Iterator[np.ndarray]:
        """Yield float32 audio chunks as soon as each is ready (first sentence first). The model
        stays loaded until the iterator is exhausted or closed."""
        self.keep_alive.acquire()
        try:
            units, opts, prepared, status = self._request(text, voice, settings)
        except BaseException:
            self.keep_alive.release()
            raise
        return HeldIterator(self._run(units, opts, prepared, stream=True, cache_status=status), self.keep_alive)

    def audio_length(self, text: str, *, voice: Any = None, **settings: Any) -> int | None:
        """Samples `stream(text, voice=voice, **settings)` will yield, when the model can tell before
        decoding (its `predict_samples`: Piper's durations; exact given a seed); None otherwise."""
        if not hasattr(self.model, "predict_samples") or settings.get("seed") is None:
            return None
        with self.keep_alive.hold():  # reloads an idle-unloaded model (runtime.keep_alive_s)
            units, opts, prepared, _ = self._request(text, voice, settings)
            predict = self.model.predict_samples
            with self._lock, self._grad_context():
                return sum(int(predict(unit, opts, prepared)) for unit in units)

    def synthesize(self, text: str, *, voice: Any = None, **settings: Any) -> tuple[np.ndarray, int]:
        """The whole utterance as one float32 array, and its sample rate."""
        with self.keep_alive.hold():
            units, opts, prepared, status = self._request(text, voice, settings)
            chunks = list(self._run(units, opts, prepared, stream=False, cache_status=status))
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return audio, self.sample_rate

    def synthesize_with_timings(self, text: str, *, voice: Any = None, **settings: Any
                                ) -> tuple[np.ndarray, int, list[WordTiming]]:
        """The whole utterance, its sample rate, and when each word is spoken: seconds from the
        start of the audio, and [start_char, end_char) spans of `text` itself (the words of "$5",
        "5 dollars", both span "$5"). InvalidInputError for a model that cannot time words."""
        from edge_runtime.models.text.alignment import TextAlignment

        with self.keep_alive.hold():
            units, opts, prepared, _ = self._request(text, voice, settings)
            if not self.model.supports_word_timings:
                raise InvalidInputError(f"{self.model.model_id} does not report word timings; "
                                        "models that do: piper voices")
            chunks: list[np.ndarray] = []
            timed: list[tuple[int, WordTiming]] = []  # (unit offset in `normalised`, word)
            offset_s, offset_c = 0.0, 0
            for unit in units:
                with self._lock, self._grad_context():
                    audio, words = self.model.synthesize_with_timings(unit, opts, prepared)
                timed += [(offset_c, replace(w, start_s=w.start_s + offset_s, end_s=w.end_s + offset_s))
                          for w in words]
                chunks.append(np.asarray(audio, dtype=np.float32))
                offset_s += len(audio) / self.sample_rate
                offset_c += len(unit) + 1
        alignment = TextAlignment(text, " ".join(units))
        out = []
        for base, w in timed:
            start, end = alignment.original_span(base + w.start_char, base + w.end_char)
            out.append(replace(w, start_char=start, end_char=end))
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return audio, self.sample_rate, out

    def _run(self, units: list[str], opts: SynthesisSettings, voice: Any, stream: bool,
             cache_status: str = "none") -> Iterator[np.ndarray]:
        record = {"request_id": uuid.uuid4().hex[:12], "model": self.model.model_id, "batch_size": 1,
                  "voice_cache": cache_status}
        start = time.perf_counter()
        first_audio = None
        samples = 0
        error = None
        try:
            for unit in units:
                for chunk in self._forward(unit, opts, voice, stream):
                    if first_audio is None:
                        first_audio = time.perf_counter() - start
                    samples += len(chunk)
                    yield chunk
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._finish(record, start, first_audio, samples, error)

    def _forward(self, unit: str, opts: SynthesisSettings, voice: Any, stream: bool) -> Iterator[np.ndarray]:
        """One unit, chunk by chunk, each step under inference mode and the model lock (held per
        step, not while a slow consumer reads). An OOM before the first chunk cleans up and retries
        once; after audio went out it fails the request, and the runtime serves the next one."""
        for attempt in (1, 2):
            produced = False
            steps = self.model.synthesize_unit(unit, opts, voice, stream=stream)
            try:
                while True:
                    with self._lock, self._grad_context():
                        chunk = next(steps, None)
                    if chunk is None:
                        return
                    produced = True
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
                if not is_oom_error(exc):
                    raise
                self.governor.recover_from_oom()
                if produced or attempt == 2:
                    raise RequestFailedError(
                        f"out of memory synthesising {len(unit)} characters even after cleanup; "
                        "try a smaller profile tier or shorter text") from exc
                log.warning("out of memory; cleaned up and retrying once")
            finally:
                steps.close()

    # -- batches ----------------------------------------------------------------------------
    def synthesize_batch(self, texts: list[str], *, voice: Any = None, max_batch: int | None = None,
                         **settings: Any) -> list[tuple[np.ndarray, int]]:
        """Several requests with the same settings, their sentences run `max_batch` at a time.

        Memory cleanup follows forwards, not requests: the governor's per-forward step runs once
        after each batch, so `per_request` cleans once per forward and `every_n` counts forwards.
        Out of memory in a batch: clean up, split it in halves and retry each half; a single sentence
        that still does not fit fails the whole call with RequestFailedError (the runtime lives on).
        """
        with self.keep_alive.hold():
            return self._synthesize_batch(texts, voice=voice, max_batch=max_batch, **settings)

    def _synthesize_batch(self, texts: list[str], *, voice: Any = None, max_batch: int | None = None,
                          **settings: Any) -> list[tuple[np.ndarray, int]]:
        opts = self._settings(**settings)
        units = [self.model.split_text(self._check_text(text)) for text in texts]
        voice, status = self._resolve_voice(voice)
        flat = [(i, unit) for i, request_units in enumerate(units) for unit in request_units]
        size = max(1, max_batch or self.batch_size())
        outputs: list[list[np.ndarray]] = [[] for _ in texts]
        start = time.perf_counter()
        error = None
        snap, cleaned = None, False
        try:
            for first in range(0, len(flat), size):
                group = flat[first:first + size]
                try:
                    for (i, _), audio in zip(group, self._forward_batch([u for _, u in group], opts, voice)):
                        outputs[i].append(audio)
                finally:
                    snap, cleanup = self._end_forward()
                    cleaned = cleaned or cleanup.cleaned
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if snap is None:  # nothing ran (no units): still one reading for the records
                snap, cleanup = self._end_forward()
                cleaned = cleanup.cleaned
            for chunks in outputs:
                record = {"request_id": uuid.uuid4().hex[:12], "model": self.model.model_id,
                          "batch_size": min(size, len(flat)), "voice_cache": status}
                self._record(record, start, None, sum(len(c) for c in chunks), error, snap, cleaned)
        return [(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), self.sample_rate)
                for chunks in outputs]

    def batch_size(self) -> int:
        configured = self.profile.batching.max_batch
        return configured if isinstance(configured, int) else 1

    def _forward_batch(self, units: list[str], opts: SynthesisSettings, voice: Any,
                       retried: bool = False) -> list[np.ndarray]:
        try:
            with self._lock, self._grad_context():
                return self.model.synthesize_batch(units, opts, voice)
        except Exception as exc:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
            if not is_oom_error(exc):
                raise
            self.governor.recover_from_oom()
            if len(units) > 1:
                half = len(units) // 2
                log.warning("out of memory at batch %d; cleaned up, retrying as %d + %d", len(units), half,
                            len(units) - half)
                return (self._forward_batch(units[:half], opts, voice)
                        + self._forward_batch(units[half:], opts, voice))
            if retried:
                raise RequestFailedError(
                    f"out of memory synthesising one sentence of {len(units[0])} characters even alone "
                    "and after cleanup; try a smaller profile tier or shorter sentences") from exc
            return self._forward_batch(units, opts, voice, retried=True)  # once more, as for one request

    def _finish(self, record: dict, start: float, first_audio: float | None, samples: int,
                error: str | None) -> None:
        """One request finished its own forwards: end them, then record it."""
        snap, cleanup = self._end_forward()
        self._record(record, start, first_audio, samples, error, snap, cleanup.cleaned)

    def _end_forward(self):
        """After a forward (one request, or one batch of several): blocks kept for repeated calls go
        back, memory is read (before cleanup: cleanup resets the CUDA peak), the governor's policy runs."""
        if self.placement_handle is not None:
            self.placement_handle.end_request()
        snap = self.governor.snapshot()
        return snap, self.governor.after_request()

    def _record(self, record: dict, start: float, first_audio: float | None, samples: int,
                error: str | None, snap: Any, cleaned: bool) -> None:
        latency = time.perf_counter() - start
        audio_s = samples / self.sample_rate
        self.telemetry.record(RequestTelemetry(
            **record, latency_s=latency, audio_seconds=audio_s,
            rtf=latency / audio_s if audio_s else None, time_to_first_audio_s=first_audio,
            rss_bytes=snap.rss_bytes, cuda_allocated=snap.cuda_allocated, cuda_reserved=snap.cuda_reserved,
            cuda_peak=snap.cuda_peak, cleaned=cleaned, error=error))

    def _grad_context(self):
        return torch.inference_mode() if self.inference_mode else torch.enable_grad()

    @property
    def last_telemetry(self) -> RequestTelemetry | None:
        return self.telemetry.last()

    @property
    def placement(self) -> dict[str, Any]:
        """How the model's weights are placed: backend, plan summary and transfer counters
        (``bytes_moved`` counts since load: subtract two readings for one request)."""
        if self.placement_handle is None:
            if self._placement_facts is not None:  # unloaded: what it was, and that it is gone
                return {**self._placement_facts, "state": self.keep_alive.state}
            return {"backend": "resident", "device": self.device}
        return self.placement_handle.describe()

    # -- idle unload (runtime.keep_alive_s; the KeepAlive in idle.py calls these) -----------------
    def using_model(self):
        """`with rt.using_model(): rt.model...` reaches the model's own methods directly, reloading
        it first if it was unloaded and keeping it loaded until the block ends."""
        return self.keep_alive.hold()

    def unload(self) -> bool:
        """Release the weights now if no request is in flight (reloaded on the next request)."""
        if self._reloader is None:
            return False
        return self.keep_alive.unload_now()

    @property
    def model_state(self) -> dict[str, Any]:
        """loaded | unloading | unloaded | loading, with unload/reload counts and durations."""
        return self.keep_alive.describe()

    def _unload_model(self) -> None:
        with self._lock:  # no forward in progress (none can start: KeepAlive holds new requests)
            model, placement = self.model, self.placement_handle
            self._placement_facts = placement.describe() if placement is not None else None
            self.model, self.placement_handle = ModelFacts(model, self.keep_alive, lambda: self.model), None
        try:
            model.close()
        finally:
            if placement is not None:
                placement.close()
            del model, placement  # the last references: the weights are garbage from here
            release_memory(self.governor)

    def _reload_model(self) -> None:
        model, placement = self._reloader()
        if model.model_id != self.model.model_id:
            raise RequestFailedError(f"reload gave {model.model_id}, expected {self.model.model_id}")
        with self._lock:
            self.model, self.placement_handle = model, placement
            self._placement_facts = None
        MemoryGovernor.freeze_baseline()  # the new weights are long-lived again

    def close(self) -> None:
        self.keep_alive.close()
        self.model.close()
        if self.placement_handle is not None:
            self.placement_handle.close()
        self.voice_cache.clear()
        MemoryGovernor.release_baseline()
        self.telemetry.close()

