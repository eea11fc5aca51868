"""Engine-facing adapter for Piper voices: text front end + PiperVits, streamed in chunks.

Within a sentence the decoder (most of the compute) runs on growing chunks of latent frames with
enough context either side that every output sample equals the whole-sentence result, so the
first audio leaves after a fraction of the sentence is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.base import ModelSource, Placer, SpeechModel, SubModel, SynthesisSettings, WordTiming
from edge_runtime.models.registry import register
from edge_runtime.models.text import TextFrontend

FIRST_CHUNK_FRAMES = 24  # ~0.28 s of audio at 22.05 kHz: small enough for early first audio
CHUNK_GROWTH = 3  # later chunks grow so decoding stays ahead of playback with little overlap waste
# Piper peak-normalises every sentence, which a stream cannot do (it has not seen the peak yet).
# One gain per voice, measured once on this sentence, gives the same loudness and stays constant.
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, and then it rests."
TARGET_PEAK = 0.9
FRAMES_PER_PHONEME = 7  # 86 frames/s at 22.05 kHz over ~12 phonemes/s of read speech (planning)


@register
class PiperModel(SpeechModel):
    family = "piper"
    supports_batch = True
    supports_word_timings = True  # exact, from the duration predictor
    # No zero-shot cloning: a prompt picks the built-in speaker that sounds closest (speaker_match).
    supports_voice_prompt = True
    voice_prompt_kind = "nearest-speaker"

    def __init__(self, vits: Any, config: Any, model_id: str, stage_dtypes: dict | None = None,
                 device: str | torch.device | None = None) -> None:
        self.vits = vits
        # Offloaded weights sit on meta between uses: the execution device is stated, not inferred.
        self.device = torch.device(device) if device is not None else next(vits.parameters()).device
        self.stage_dtypes = stage_dtypes or {name: torch.float32 for name in self.components_of(vits)}
        self.config = config
        self.model_id = model_id
        self.sample_rate = config.sample_rate
        self.frontend = TextFrontend(config.espeak_voice, config.phoneme_id_map)
        self._speaker_prints: np.ndarray | None = None
        self.gain = 1.0  # calibration synthesises through _finish_audio, which applies the gain
        self.gain = self._calibrate_gain()

    def _calibration_audio(self, speaker: int | None) -> np.ndarray:
        quiet = SynthesisSettings(noise_scale=0.0, noise_w=0.0, speaker=speaker)
        with torch.inference_mode():
            return np.concatenate(list(self.synthesize_unit(CALIBRATION_TEXT, quiet)))

    def _calibrate_gain(self) -> float:
        peak = float(np.abs(self._calibration_audio(None)).max())
        return TARGET_PEAK / peak if peak > 1e-4 else 1.0

    # -- voice prompts -----------------------------------------------------------------------
    def speaker_fingerprints(self) -> np.ndarray:
        """[speakers, dims] fingerprints of each speaker reading the calibration sentence (computed
        once, on the first prompt: about 50 ms per speaker)."""
        if self._speaker_prints is None:
            from edge_runtime.models.piper.speaker_match import fingerprint

            n = self.config.num_speakers
            ids = [None] if n <= 1 else list(range(n))
            self._speaker_prints = np.stack([fingerprint(self._calibration_audio(i), self.sample_rate)
                                             for i in ids])
        return self._speaker_prints

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None):
        """A clean prompt -> PreparedVoice naming the nearest built-in speaker and its similarity."""
        from edge_runtime.models.piper.speaker_match import fingerprint, nearest
        from edge_runtime.prepared_voice import PreparedVoice

        query = fingerprint(audio, sample_rate)
        index, sims = nearest(query, self.speaker_fingerprints())
        return PreparedVoice(tensors={"fingerprint": torch.from_numpy(query)}, model_id=self.model_id,
                             sample_rate=sample_rate, transcript=transcript,
                             extra={"kind": self.voice_prompt_kind, "speaker_id": index,
                                    "similarity": round(float(sims[index]), 4)})

    # -- the family ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, spec: str) -> ModelSource | None:
        """``piper:NAME`` (embedded, or NAME.onnx in the voices folder) or a path to a .onnx voice."""
        from edge_runtime.models.piper.catalog import EMBEDDED, embedded_voice, voices_dir

        if spec.startswith("piper:"):
            name = spec.split(":", 1)[1]
            found = embedded_voice(name)
            if found:
                return ModelSource(cls, spec, found[0], files={"config": found[1]})
            candidate = voices_dir() / f"{name}.onnx"
            if candidate.is_file():
                return ModelSource(cls, spec, candidate)
            raise ModelNotFoundError(
                f"no Piper voice named {name!r}: looked for the embedded voices {sorted(EMBEDDED)} and "
                f"for {candidate}. Put NAME.onnx and NAME.onnx.json there, or pass --model path/to/voice.onnx")
        path = Path(spec).expanduser()
        if path.suffix == ".onnx":
            if not path.is_file():
                raise ModelNotFoundError(f"voice file {path} does not exist")
            return ModelSource(cls, f"piper:{path.stem}", path)
        return None

    @classmethod
    def installed(cls) -> list[dict[str, Any]]:
        from edge_runtime.models.piper.catalog import EMBEDDED, embedded_voice, voices_dir

        found = [{"id": f"piper:{name}", "source": "embedded", "path": str(paths[0])}
                 for name in sorted(EMBEDDED) if (paths := embedded_voice(name))]
        folder = voices_dir()
        if folder.is_dir():
            found += [{"id": f"piper:{onnx.stem}", "source": "voices dir", "path": str(onnx)}
                      for onnx in sorted(folder.glob("*.onnx"))]
        return found

    @classmethod
    def layout(cls, source: ModelSource, dtype: torch.dtype, fp32_components: tuple[str, ...] = ()):
        """The VITS stages measured on a meta skeleton; the decoder's activations per output sample."""
        from accelerate import init_empty_weights

        from edge_runtime.models.piper.vits import PiperVits, skip_weight_init
        from edge_runtime.models.piper.weights_cache import cached_weights
        from edge_runtime.policy.planner import CODEC_ACTIVATION_COPIES, describe_model

        _, _, hp = cached_weights(source.path, source.files.get("config"))
        # no random init: on meta tensors it would import torch's compiler stack (seconds per process)
        with skip_weight_init(), init_empty_weights(include_buffers=False):
            skeleton = PiperVits(hp)
        layout = describe_model(skeleton, cls.components_of(skeleton), autoregressive=(), dtype=dtype,
                                fp32_components=fp32_components)
        # Tokens are phonemes, but the HiFi-GAN decoder's peak is per output sample: ~3 tensors of
        # (last-stage channels x samples), at ~7 latent frames per phoneme of read speech.
        last_channels = hp.upsample_initial_channel // 2 ** len(hp.upsample_rates)
        width = CODEC_ACTIVATION_COPIES * FRAMES_PER_PHONEME * hp.hop_length * last_channels
        return layout.replace_component("decoder", activation_width=width)

    @classmethod
    def load(cls, source: ModelSource, placer: Placer) -> PiperModel:
        """Resident on the execution device: straight from the converted weights, with the fast
        paths (prepared weight copies). Offloaded: block by block through the placer from the
        cached safetensors weights, the stages running as plain modules ("eager"), since the fast
        paths' prepared copies would defeat offloading."""
        from edge_runtime.models.piper.vits import PiperVits, skip_weight_init
        from edge_runtime.models.piper.weights_cache import cached_weights, load_piper_voice

        fp32 = tuple(placer.fp32_components)
        if not placer.offloaded:
            vits, config = load_piper_voice(source.path, source.files.get("config"), mode="eager")
            vits = vits.to(placer.device).eval()
            for param in vits.parameters():  # weights are constants here: no autograd bookkeeping
                param.requires_grad_(False)
            stage_dtypes = cls.cast_components(vits, placer.dtype, fp32)
            vits.prepare_for_inference()  # after casting: it derives its buffers from the weights
            return cls(vits, config, source.model_id, stage_dtypes, device=placer.device)
        path, config, hp = cached_weights(source.path, source.files.get("config"))

        def build() -> PiperVits:
            with skip_weight_init():
                return PiperVits(hp)

        vits = placer.place(SubModel(name="", build=build, checkpoint=path, fp32_modules=fp32))
        vits.prepare_for_inference("eager")
        stage_dtypes = {name: torch.float32 if name in fp32 else placer.dtype for name in cls.components_of(vits)}
        return cls(vits, config, source.model_id, stage_dtypes, device=placer.device)

    @staticmethod
    def components_of(vits: Any) -> dict[str, Any]:
        return {"text_encoder": vits.text_encoder, "duration_predictor": vits.duration_predictor,
                "flow": vits.flow, "decoder": vits.decoder}

    @classmethod
    def cast_components(cls, vits: Any, dtype: torch.dtype, fp32_components: tuple[str, ...]) -> dict:
        """Each stage in `dtype`, except the fragile ones named in the profile, which stay fp32
        (the VITS duration predictor's spline flows fail in fp16). Returns stage -> dtype."""
        dtypes = {}
        for name, module in cls.components_of(vits).items():
            dtypes[name] = torch.float32 if name in fp32_components else dtype
            module.to(dtypes[name])
        return dtypes

    def components(self) -> dict[str, Any]:
        return self.components_of(self.vits)

    def _cast(self, stage: str, *tensors: torch.Tensor | None):
        """The explicit precision boundary: floating inputs of `stage` in that stage's dtype."""
        dtype = self.stage_dtypes[stage]
        out = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
        return out if len(out) > 1 else out[0]

    def speakers(self) -> list[str]:
        return sorted(self.config.speaker_id_map, key=self.config.speaker_id_map.get)

    def _speaker_id(self, speaker: str | int | None) -> int | None:
        if speaker is None:
            return None
        n = self.config.num_speakers
        if isinstance(speaker, int):
            if not 0 <= speaker < n:
                raise InvalidInputError(f"speaker {speaker} is out of range; {self.model_id} has speakers 0..{n - 1}")
            return speaker
        if speaker not in self.config.speaker_id_map:
            names = ", ".join(self.speakers()[:20]) or "none (single-speaker voice)"
            raise InvalidInputError(f"unknown speaker {speaker!r} for {self.model_id}; allowed: {names}")
        return self.config.speaker_id_map[speaker]

    def _with_voice(self, settings: SynthesisSettings, voice: Any) -> SynthesisSettings:
        """A prepared prompt chooses the speaker unless the request names one."""
        if voice is None or settings.speaker is not None or self.config.num_speakers <= 1:
            return settings
        from dataclasses import replace

        return replace(settings, speaker=int(voice.extra["speaker_id"]))

    def check_settings(self, settings: SynthesisSettings) -> None:
        self._speaker_id(settings.speaker)

    def split_text(self, text: str) -> list[str]:
        return self.frontend.sentences(text)

    def _latent(self, id_lists: list[tuple[int, ...]], settings: SynthesisSettings, durations_out: list | None = None):
        """Phoneme ids (a batch, padded) -> decoder input z, speaker conditioning, frames per item
        (and, into `durations_out` when given, the frames of each phoneme id [B, T])."""
        cfg, vits = self.config, self.vits
        device = self.device
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=device).manual_seed(settings.seed)
        width = max(len(ids) for ids in id_lists)
        ids = torch.zeros(len(id_lists), width, dtype=torch.long, device=device)
        for row, item in enumerate(id_lists):
            ids[row, :len(item)] = torch.tensor(item, dtype=torch.long)
        lengths = torch.tensor([len(item) for item in id_lists], dtype=torch.long, device=device)
        g = vits.speaker(self._speaker_id(settings.speaker), len(id_lists), device)
        noise_w = cfg.noise_w if settings.noise_w is None else settings.noise_w
        noise_scale = cfg.noise_scale if settings.noise_scale is None else settings.noise_scale
        enc = vits.encode(ids, lengths)
        hidden, mask, g_dp = self._cast("duration_predictor", enc.hidden, enc.mask, g)
        durations = vits.predict_durations(enc._replace(hidden=hidden, mask=mask), noise_w,
                                           cfg.length_scale / settings.speed, g_dp, generator)
        if durations_out is not None:
            durations_out.append(durations.float())
        prior = vits.expand(enc, durations.float())
        m, logs, fmask, g_flow = self._cast("flow", prior.m, prior.logs, prior.mask, g)
        z = vits.flow_reverse(prior._replace(m=m, logs=logs, mask=fmask), noise_scale, g_flow, generator)
        return self._cast("decoder", z), self._cast("decoder", g), prior.lengths

    def predict_samples(self, unit: str, settings: SynthesisSettings, voice: Any = None) -> int:
        """Samples synthesize_unit yields for `unit`, from the duration predictor alone (no flow, no
        decoder). It draws the same seeded noise as _latent, so it is exact when settings.seed is set
        (Runtime.audio_length asks only then): streamed WAV headers carry the true length."""
        utt = self.frontend.utterance(unit)
        if len(utt.phonemes) == 0:
            return 0
        settings = self._with_voice(settings, voice)
        cfg, vits, device = self.config, self.vits, self.device
        generator = None if settings.seed is None else torch.Generator(device=device).manual_seed(settings.seed)
        ids = torch.tensor([utt.ids], dtype=torch.long, device=device)
        lengths = torch.tensor([len(utt.ids)], dtype=torch.long, device=device)
        g = vits.speaker(self._speaker_id(settings.speaker), 1, device)
        noise_w = cfg.noise_w if settings.noise_w is None else settings.noise_w
        enc = vits.encode(ids, lengths)
        hidden, mask, g_dp = self._cast("duration_predictor", enc.hidden, enc.mask, g)
        durations = vits.predict_durations(enc._replace(hidden=hidden, mask=mask), noise_w,
                                           cfg.length_scale / settings.speed, g_dp, generator)
        return int(torch.clamp_min(durations.sum(dim=1), 1)[0]) * vits.hop_length

    def _finish_audio(self, audio: torch.Tensor) -> np.ndarray:
        samples = audio.detach().float().cpu().numpy().reshape(-1)
        return np.clip(samples * self.gain, -1.0, 1.0) if self.gain != 1.0 else samples

    def synthesize_unit(self, unit: str, settings: SynthesisSettings, voice: Any = None,
                        stream: bool = False) -> Iterator[np.ndarray]:
        utt = self.frontend.utterance(unit)
        if len(utt.phonemes) == 0:
            return
        z, g, _ = self._latent([utt.ids], self._with_voice(settings, voice))
        if not stream or z.shape[-1] <= FIRST_CHUNK_FRAMES * 2:
            yield self._finish_audio(self.vits.decode(z, g))
            return
        for audio in self.vits.decode_chunks(z, g, FIRST_CHUNK_FRAMES, CHUNK_GROWTH):
            yield self._finish_audio(audio)

    def synthesize_batch(self, units: list[str], settings: SynthesisSettings,
                         voice: Any = None) -> list[np.ndarray]:
        """Several units in one padded forward pass; audio per unit, trimmed to its own length."""
        utts = [self.frontend.utterance(unit) for unit in units]
        spoken = [k for k, utt in enumerate(utts) if len(utt.phonemes)]
        out = [np.zeros(0, dtype=np.float32) for _ in units]
        if not spoken:
            return out
        z, g, frames = self._latent([utts[k].ids for k in spoken], self._with_voice(settings, voice))
        audio = self.vits.decode(z, g)
        hop = self.vits.hop_length
        for row, k in enumerate(spoken):
            out[k] = self._finish_audio(audio[row, :int(frames[row]) * hop])
        return out

    # -- word timings ---------------------------------------------------------------------------
    def _id_spans(self, phonemes: tuple[str, ...]) -> list[tuple[int, int]]:
        """[first, last) phoneme-id positions of each phoneme character (its pad included), as
        PhonemeIdMapper lays them out; a character the voice lacks has an empty span."""
        id_map = self.frontend.mapper.id_map
        pad = len(id_map["_"])
        pos = len(id_map["^"]) + pad
        spans = []
        for ch in phonemes:
            mapped = id_map.get(ch)
            width = 0 if mapped is None else len(mapped) + pad
            spans.append((pos, pos + width))
            pos += width
        return spans

    def synthesize_with_timings(self, unit: str, settings: SynthesisSettings, voice: Any = None
                                ) -> tuple[np.ndarray, list[WordTiming]]:
        """The audio synthesize_unit gives for `unit` and when each of its words is spoken, exact
        from the duration predictor: each phoneme id lasts its frames x hop / rate. Phonemes go to
        words by matching the sentence's phonemes with each word phonemised alone
        (text.alignment.label_phonemes); char offsets are into `unit`."""
        from edge_runtime.models.text.alignment import label_phonemes, words_of

        utt = self.frontend.utterance(unit)
        if len(utt.phonemes) == 0:
            return np.zeros(0, dtype=np.float32), []
        durations: list[torch.Tensor] = []
        z, g, frames = self._latent([utt.ids], self._with_voice(settings, voice), durations)
        hop = self.vits.hop_length
        audio = self._finish_audio(self.vits.decode(z, g)[..., :int(frames[0]) * hop])
        words = words_of(unit)
        phonemizer = self.frontend.phonemizer
        labels = label_phonemes(utt.phonemes, [phonemizer.phonemize(w.text) for w in words])
        ends = torch.cumsum(durations[0][0], dim=0).tolist()
        spans = self._id_spans(utt.phonemes)
        # frames [first, last) of each word, over its phoneme characters that have ids
        bounds: dict[int, list[float]] = {}
        for (lo, hi), label in zip(spans, labels):
            if label < 0 or hi <= lo:
                continue
            start, end = (ends[lo - 1] if lo else 0.0), ends[hi - 1]
            if label in bounds:
                bounds[label][1] = end
            else:
                bounds[label] = [start, end]
        scale = hop / self.sample_rate
        out: list[WordTiming] = []
        lead: int | None = None  # start of leading words with no phoneme of their own
        for i, word in enumerate(words):
            if i not in bounds:  # no phoneme of its own: it joins the word before (or after)
                if out:
                    prev = out[-1]
                    out[-1] = WordTiming(unit[prev.start_char:word.end], prev.start_s, prev.end_s,
                                         prev.start_char, word.end)
                elif lead is None:
                    lead = word.start
                continue
            first = word.start if lead is None else lead
            lead = None
            start, end = bounds[i]
            out.append(WordTiming(unit[first:word.end], start * scale, end * scale, first, word.end))
        return audio, out
