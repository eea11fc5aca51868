"""CosyVoice2/3's voice-prompt front end: prompt audio (+ transcript) -> a :class:`CosyVoicePrompt`.

What upstream's ``frontend_zero_shot`` computes, once per voice:
    16 kHz audio -> whisper log-mel -> ``speech_tokenizer_v2.onnx`` (v3: ``_v3``) -> 25 Hz speech tokens
    16 kHz audio -> Kaldi fbank     -> ``campplus.onnx``            -> 192-d speaker embedding
    24 kHz audio -> Matcha mel (50 frames/s)                        -> the flow's prompt features
    transcript   -> text token ids (absent: the prompt can only be used cross-lingually)
Tokens and mel are then cut to the same duration, frames = token_mel_ratio (2) x tokens, keeping
the shorter of the two, as upstream does for CosyVoice2.

How the three upstream modes use a prompt (:meth:`CosyVoicePrompt.lm_prompt`); the flow always gets
the prompt's tokens, mel and embedding:
    zero-shot      LM reads [transcript ids + text] and continues after the prompt's speech tokens
    cross-lingual  LM reads the text alone: no transcript, no prompt speech tokens
    instruct       LM reads [instruction + "<|endofprompt|>" + text], no prompt speech tokens

Both ONNX models run on the CPU through onnxruntime, in sessions opened on first use.

Prompt audio is refused (InvalidInputError) when it is not mono float, holds NaN/inf, looks like
unscaled integer PCM (peak above 8), is sampled below 16 kHz, is shorter than 0.2 s (fewer than 5
speech tokens / 10 prompt frames) or longer than 30 s (the speech tokenizer's window), or is
silent: RMS below -60 dBFS (1e-3 of full scale), a level no usable speech recording sits under.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.dsp import resample
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import yaml_config
from edge_runtime.models.cosyvoice.features import (
    WHISPER_RATE, PromptMelConfig, prompt_mel, speaker_fbank, whisper_log_mel)
from edge_runtime.models.cosyvoice.folder import QWEN_DIR, SPEAKER_ONNX, V2, V3, Version
from edge_runtime.models.cosyvoice.tokenizer import ENDOFPROMPT, CosyVoiceTextTokenizer

MAX_PROMPT_SECONDS = 30.0
MIN_PROMPT_SECONDS = 0.2
MIN_SAMPLE_RATE = WHISPER_RATE  # upsampled narrowband audio would give the flow a prompt with no highs
MAX_SAMPLE_RATE = 192000
SILENCE_RMS = 1e-3  # -60 dBFS
MAX_PEAK = 8.0  # float audio far beyond full scale is integer PCM that was never divided by 32768

# The ONNX graphs' names, as the published files have them (upstream feeds them positionally).
SPEAKER_IO = (("input",), ("output",))
TOKENIZER_IO = (("feats", "feats_length"), ("indices",))


class PromptMode(str, enum.Enum):
    ZERO_SHOT = "zero_shot"
    CROSS_LINGUAL = "cross_lingual"
    INSTRUCT = "instruct"


@dataclass(frozen=True, eq=False)
class LMPrompt:
    """What the LM reads around the target text: [sos, text_ids + text, task_id, speech_tokens]."""

    text_ids: torch.Tensor  # [N] int32, may be empty
    speech_tokens: torch.Tensor  # [T] int32, may be empty


@dataclass(frozen=True, eq=False)  # identity equality: comparing tensors is ambiguous
class CosyVoicePrompt:
    """One prepared voice (CPU tensors, no batch dimension): a few hundred KB for a 10 s prompt."""

    speech_tokens: torch.Tensor  # [T] int32, 25 Hz: the flow's prompt tokens (and the LM's, zero-shot)
    prompt_feat: torch.Tensor  # [2T, 80] float32 log-mel at 24 kHz: the flow's first 2T frames
    embedding: torch.Tensor  # [192] float32 CAM++ speaker embedding (the flow normalises it)
    text_ids: torch.Tensor | None = None  # [N] int32 transcript ids; None: no transcript

    @property
    def mode(self) -> PromptMode:
        """The default mode: zero-shot with a transcript, cross-lingual without."""
        return PromptMode.CROSS_LINGUAL if self.text_ids is None else PromptMode.ZERO_SHOT

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor (no ``text_ids`` without a transcript), for storing; see :meth:`from_tensors`."""
        out = {"speech_tokens": self.speech_tokens, "prompt_feat": self.prompt_feat, "embedding": self.embedding}
        if self.text_ids is not None:
            out["text_ids"] = self.text_ids
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> CosyVoicePrompt:
        """The inverse of :meth:`tensors` (values may be numpy arrays), checking shapes."""
        try:
            tokens = torch.as_tensor(tensors["speech_tokens"]).to(torch.int32).reshape(-1)
            feat = torch.as_tensor(tensors["prompt_feat"]).to(torch.float32)
            embedding = torch.as_tensor(tensors["embedding"]).to(torch.float32).reshape(-1)
        except KeyError as exc:
            raise InvalidInputError(f"a stored CosyVoice voice lacks {exc.args[0]!r} "
                                    "(it needs speech_tokens, prompt_feat, embedding)") from None
        text = tensors.get("text_ids")
        if feat.dim() != 2 or tokens.numel() == 0 or feat.shape[0] % tokens.numel():
            raise InvalidInputError(f"a stored CosyVoice voice has prompt_feat {list(feat.shape)} for "
                                    f"{tokens.numel()} speech tokens: expected [k * tokens, mels], k >= 1")
        return cls(tokens, feat, embedding, None if text is None else torch.as_tensor(text).to(torch.int32).reshape(-1))

    def lm_prompt(self, mode: PromptMode | str | None = None, instruction_ids: Sequence[int] = ()) -> LMPrompt:
        """The LM's prompt for ``mode`` (default: instruct when ``instruction_ids`` are given, else
        :attr:`mode`). ``instruction_ids`` come from :meth:`CosyVoiceFrontend.instruction_ids`."""
        if mode is None:
            mode = PromptMode.INSTRUCT if len(instruction_ids) else self.mode
        try:
            mode = PromptMode(mode)
        except ValueError:
            raise InvalidInputError(f"CosyVoice prompt mode {mode!r} is not one of "
                                    f"{', '.join(m.value for m in PromptMode)}") from None
        none = torch.zeros(0, dtype=torch.int32)
        if mode is PromptMode.INSTRUCT:
            if not len(instruction_ids):
                raise InvalidInputError("instruct mode needs instruction text (it was empty)")
            return LMPrompt(torch.tensor(list(instruction_ids), dtype=torch.int32), none)
        if mode is PromptMode.ZERO_SHOT:
            if self.text_ids is None:
                raise InvalidInputError("zero-shot mode needs the prompt's transcript; this voice was "
                                        "prepared without one (use cross-lingual mode or re-prepare it)")
            return LMPrompt(self.text_ids, self.speech_tokens)
        return LMPrompt(none, none)


def _onnx_session(path: Path, io: tuple[tuple[str, ...], tuple[str, ...]], threads: int):
    """A CPU onnxruntime session for ``path`` whose input names are exactly ``io[0]`` and whose
    outputs include ``io[1]``."""
    if not path.is_file():
        raise InvalidInputError(f"{path.name} is missing from {path.parent} (CosyVoice needs it for voice prompts)")
    try:
        import onnxruntime as ort
    except ImportError:
        raise InvalidInputError("CosyVoice voice prompts need onnxruntime: "
                                "pip install 'edge-runtime[cosyvoice]' (or onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base
        raise InvalidInputError(f"{path} is not a loadable ONNX model ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if sorted(inputs) != sorted(io[0]) or not set(io[1]) <= set(outputs):
        raise InvalidInputError(f"{path} has inputs {list(inputs)} and outputs {list(outputs)}; expected "
                                f"inputs {list(io[0])} and outputs {list(io[1])}")
    return session


def _checked_audio(audio: Any, sample_rate: Any) -> np.ndarray:
    """Validated prompt audio as mono float32 [samples]."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InvalidInputError(f"prompt sample_rate must be an integer in Hz, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidInputError(f"prompt sample_rate {sample_rate} Hz is outside "
                                f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    x = np.asarray(audio)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidInputError(f"prompt audio must be float samples in [-1, 1], got dtype {x.dtype}")
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise InvalidInputError(f"prompt audio must be mono [samples], got shape {list(x.shape)}")
    seconds = x.size / sample_rate
    if seconds > MAX_PROMPT_SECONDS:
        raise InvalidInputError(f"prompt audio is {seconds:.1f} s long; at most {MAX_PROMPT_SECONDS:g} s is allowed")
    if seconds < MIN_PROMPT_SECONDS:
        raise InvalidInputError(f"prompt audio is {seconds:.3f} s long; at least {MIN_PROMPT_SECONDS:g} s is needed")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - finite.sum())
        raise InvalidInputError(f"prompt audio has {bad} non-finite samples (NaN/inf), first at index "
                                f"{int(np.argmin(finite))}")
    x = x.astype(np.float32, copy=False)
    peak = float(np.abs(x).max())
    if peak > MAX_PEAK:
        raise InvalidInputError(f"prompt audio peaks at {peak:g}; samples must be in [-1, 1] (integer PCM "
                                "divided by 32768)")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms < SILENCE_RMS:
        level = -math.inf if rms == 0 else 20 * math.log10(rms)
        raise InvalidInputError(f"prompt audio is silent: RMS {level:.1f} dBFS, below the "
                                f"{20 * math.log10(SILENCE_RMS):.0f} dBFS needed")
    return x


class CosyVoiceFrontend:
    """Speech tokenizer, speaker embedding, prompt mel and transcript ids for a CosyVoice2 or
    CosyVoice3 folder (``version``: which files and mel settings).

    ``yaml`` is the folder's parsed ``cosyvoice2.yaml`` (read here when not given); ``tokenizer``
    may be shared with the caller's (loaded from ``CosyVoice-BlankEN/`` on first use otherwise).
    ``threads`` bounds each ONNX session's intra-op threads. Safe to call from several threads.
    """

    def __init__(self, folder: str | Path, yaml: dict | None = None, *,
                 tokenizer: CosyVoiceTextTokenizer | None = None, threads: int = 2, version: Version = V2) -> None:
        self.folder = Path(folder)
        self.version = version
        if yaml is None:
            try:
                yaml = yaml_config.load(self.folder / version.yaml)
            except (OSError, ValueError) as exc:
                raise InvalidInputError(f"cannot read {version.yaml} in {self.folder}: {exc}") from None
        # CosyVoice3's prompt mel runs up to Nyquist (its feat_extractor says fmax: null)
        self.mel = PromptMelConfig.from_yaml(yaml, default_fmax=8000.0 if version is V2 else None)
        self.token_mel_ratio = int(yaml.get("token_mel_ratio", 2))
        self.embedding_dim = int(yaml.get("spk_embed_dim", 192))
        self.speech_codes = int((yaml.get("flow") or {}).get("vocab_size", 6561))
        self.threads = max(1, int(threads))
        self._tokenizer = tokenizer
        self._speaker = None
        self._speech_tokenizer = None
        self._lock = threading.Lock()

    # -- lazily opened parts ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> CosyVoiceTextTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = CosyVoiceTextTokenizer(self.folder / QWEN_DIR, version=3 if self.version is V3 else 2)
            return self._tokenizer

    def _speaker_session(self):
        with self._lock:
            if self._speaker is None:
                self._speaker = _onnx_session(self.folder / SPEAKER_ONNX, SPEAKER_IO, self.threads)
            return self._speaker

    def _tokenizer_session(self):
        with self._lock:
            if self._speech_tokenizer is None:
                self._speech_tokenizer = _onnx_session(self.folder / self.version.tokenizer_onnx, TOKENIZER_IO,
                                                       self.threads)
            return self._speech_tokenizer

    # -- the three front ends ---------------------------------------------------------------------
    def speech_tokens(self, audio_16k: np.ndarray) -> torch.Tensor:
        """[T] int32 speech tokens (25 Hz) of 16 kHz audio (at most 30 s)."""
        feats = whisper_log_mel(audio_16k)
        (indices,) = self._tokenizer_session().run(
            [TOKENIZER_IO[1][0]], {"feats": feats[None].numpy(),
                                   "feats_length": np.array([feats.shape[1]], dtype=np.int32)})
        tokens = torch.from_numpy(np.asarray(indices).reshape(-1).astype(np.int32))
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.speech_codes):
            raise InvalidInputError(f"{self.folder / self.version.tokenizer_onnx} gave speech tokens in {int(tokens.min())}.."
                                    f"{int(tokens.max())}; the flow reads 0..{self.speech_codes - 1}")
        return tokens

    def speaker_embedding(self, audio_16k: np.ndarray) -> torch.Tensor:
        """[192] float32 CAM++ embedding of 16 kHz audio."""
        fbank = speaker_fbank(audio_16k)
        (out,) = self._speaker_session().run([SPEAKER_IO[1][0]], {"input": fbank[None].numpy()})
        embedding = torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1))
        if embedding.numel() != self.embedding_dim:
            raise InvalidInputError(f"{self.folder / SPEAKER_ONNX} gave a {embedding.numel()}-d embedding; "
                                    f"{self.version.yaml} says spk_embed_dim {self.embedding_dim}")
        return embedding

    def instruction_ids(self, instruction: str) -> list[int]:
        """LM prompt ids of an instruction (instruct mode): the text, then ``<|endofprompt|>``."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidInputError(f"instruction must be non-empty text, got {instruction!r}")
        return self.tokenizer.encode(instruction.strip() + ENDOFPROMPT)

    def prepare_prompt(self, audio: np.ndarray, sample_rate: int, transcript: str | None = None) -> CosyVoicePrompt:
        """Prompt audio (mono float, any rate 16..192 kHz, 0.2..30 s) and, for zero-shot use, its
        transcript (normalised as the target text is) -> a prepared voice. A blank transcript counts as
        none."""
        x = _checked_audio(audio, sample_rate)
        if transcript is not None and not isinstance(transcript, str):
            raise InvalidInputError(f"transcript must be text or None, got {type(transcript).__name__}")
        audio_16k = resample(x, sample_rate, WHISPER_RATE)
        # the 24 kHz copy comes from the original audio (upstream goes through 16 kHz; at 16 kHz
        # input the two paths are the same)
        audio_mel = resample(x, sample_rate, self.mel.sampling_rate)
        tokens = self.speech_tokens(audio_16k)
        feat = prompt_mel(audio_mel, self.mel)
        n = min(feat.shape[0] // self.token_mel_ratio, tokens.numel())
        if n < 1:
            raise InvalidInputError(f"prompt audio of {x.size / sample_rate:.3f} s gave {tokens.numel()} speech "
                                    f"tokens and {feat.shape[0]} mel frames; at least 1 token and "
                                    f"{self.token_mel_ratio} frames are needed")
        text = transcript.strip() if transcript else ""
        return CosyVoicePrompt(
            speech_tokens=tokens[:n].clone(),
            prompt_feat=feat[: n * self.token_mel_ratio].clone(),  # clone: drop the cut-off rows
            embedding=self.speaker_embedding(audio_16k),
            text_ids=torch.tensor(self.tokenizer.encode(text), dtype=torch.int32) if text else None,
        )
