"""CosyVoice2's speech-token language model, written for edge_runtime.

A Qwen2.5-0.5B decoder (transformers' ``Qwen2ForCausalLM``; its text head is never run) reads

    [sos, embed_text(prompt_text + text), task_id, speech_embedding(prompt speech tokens)]

and continues it with speech tokens (0..6560 = 25 Hz FSQ codes; 6561 = end of speech), each
sampled with RAS (:mod:`.sampling`) from ``llm_decoder`` (hidden -> 6564 scores) and fed back
through ``speech_embedding``. Prompt text and prompt speech tokens come from the voice prompt
(zero-shot cloning); an instruction + ``<|endofprompt|>`` in place of the prompt text and no prompt
speech is the instruct mode; neither is the cross-lingual mode.

Parameter names and shapes are upstream's ``Qwen2LM`` ones (``llm.model.model.*``,
``llm.model.lm_head.weight``, ``speech_embedding``, ``llm_embedding``, ``llm_decoder``), so
``llm.pt`` loads with ``strict=True``. Construction does no data-dependent work: the model can be
built on the meta device (or with accelerate's ``init_empty_weights``) and filled afterwards.

Decoding (:meth:`CosyVoice2LM.generate`) follows upstream's loop step for step (lengths, EOS
re-draws, dropped task/fill ids), so with a ``torch.Generator`` seeded ``s`` it yields the tokens
upstream yields after ``torch.manual_seed(s)`` -- upstream as it behaves with the transformers 4
it was written for: under transformers 5 its one-step mask (length 1) is right-padded with
"masked", so each of its decoding steps attends to the first position only.

CosyVoice3's LM (:class:`CosyVoice3LM`, ``cosyvoice3.yaml``) is the same backbone with another
speech vocabulary: ``speech_embedding`` and ``llm_decoder`` (no bias) have 6561 + 200 rows, the
markers live in ``speech_embedding`` (sos 6561, end of speech 6562, task id 6563, fill 6564; no
``llm_embedding``), every id >= 6561 ends decoding, and the text must hold ``<|endofprompt|>``.
Its decoding follows the upstream version it ships with: before the minimum length only id 6561
is masked (upstream masks ``speech_token_size``, which is sos there, not end of speech), a
repetition re-draw excludes the repeated token, and runs of silence tokens longer than 5 are left
out of what is yielded (upstream's ``llm_job``; the LM itself still sees them).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from edge_runtime.errors import InvalidInputError, ModelNotFoundError, RequestFailedError
from edge_runtime.models.cosyvoice import yaml_config
from edge_runtime.models.cosyvoice.folder import QWEN_DIR, V3_YAML
from edge_runtime.models.cosyvoice.folder import YAML as V2_YAML
from edge_runtime.models.cosyvoice.half_weights import use_half_weight_linears
from edge_runtime.models.cosyvoice.sampling import RASSettings, ras_sampling

IdsLike = Sequence[int] | torch.Tensor | np.ndarray

# transformers 5 names the decoder's cache argument ``cache`` (``past_key_values`` still works,
# with a deprecation warning, until 5.40); transformers 4 only knows ``past_key_values``.
_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"

# Upstream re-draws an end-of-speech sampled before the minimum length up to 100 times.
_EOS_REDRAWS = 100

ENDOFPROMPT_ID = 151646  # <|endofprompt|> in the published vocabulary; CosyVoice3's LM asserts it
# CosyVoice3Model.silent_tokens (FSQ codes of silence and breath) and its llm_job's run limit.
SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
MAX_SILENT_RUN = 5


@dataclass(frozen=True)
class LMConfig:
    """Everything the LM is built from: the backbone's ``config.json`` (as a dict) and the numbers
    of the ``llm`` section of ``cosyvoice2.yaml`` (defaults: CosyVoice2-0.5B's)."""

    qwen: dict[str, Any] = field(hash=False)
    speech_token_size: int = 6561
    llm_input_size: int = 896
    llm_output_size: int = 896
    sampling: RASSettings = RASSettings()
    version: int = 2  # 2: CosyVoice2's Qwen2LM; 3: CosyVoice3LM
    # CosyVoice3 only: an id the text (prompt text + text) must hold, as upstream asserts for
    # <|endofprompt|> (151646); None: not checked (e.g. a test vocabulary without it)
    endofprompt_id: int | None = None

    def __post_init__(self) -> None:
        if self.version not in (2, 3):
            raise InvalidInputError(f"version={self.version!r}: allowed are 2 (CosyVoice2) and 3 (CosyVoice3)")

    @property
    def eos(self) -> int:
        """End of speech: the first id after the speech codes (v2), the second (v3: the first is sos)."""
        return self.speech_token_size + (1 if self.version == 3 else 0)

    @property
    def speech_vocab(self) -> int:
        """Rows of ``speech_embedding`` / outputs of ``llm_decoder``: codes + eos, task id, fill (v2),
        codes + 200 reserved ids (v3)."""
        return self.speech_token_size + (200 if self.version == 3 else 3)

    def qwen_config(self) -> Qwen2Config:
        """The backbone's transformers config, set to run attention through SDPA."""
        return Qwen2Config.from_dict(dict(self.qwen), attn_implementation="sdpa")

    @classmethod
    def from_folder(cls, folder: str | Path, version: int | None = None) -> LMConfig:
        """Read the folder's yaml (tags ignored) and ``CosyVoice-BlankEN/config.json``.

        ``version`` None: 3 when the folder holds ``cosyvoice3.yaml`` and no ``cosyvoice2.yaml``,
        else 2; the yaml read is ``cosyvoice{version}.yaml``."""
        folder = Path(folder)
        if version is None:
            version = 3 if (folder / V3_YAML).is_file() and not (folder / V2_YAML).is_file() else 2
        if version not in (2, 3):
            raise InvalidInputError(f"version={version!r}: allowed are 2 (CosyVoice2) and 3 (CosyVoice3)")
        name = V3_YAML if version == 3 else V2_YAML
        yaml_path, json_path = folder / name, folder / QWEN_DIR / "config.json"
        missing = [str(p) for p in (yaml_path, json_path) if not p.is_file()]
        if missing:
            raise ModelNotFoundError(f"not a CosyVoice{version} model folder: missing {', '.join(missing)}")
        llm = yaml_config.load(yaml_path).get("llm")
        if not isinstance(llm, dict):
            raise InvalidInputError(f"{yaml_path}: no 'llm' section (a CosyVoice{version} yaml has one)")
        try:
            qwen = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"{json_path}: not readable JSON ({e})") from e
        if not isinstance(qwen, dict) or qwen.get("model_type") != "qwen2" or "hidden_size" not in qwen:
            raise InvalidInputError(f"{json_path}: expected a Qwen2 config (model_type 'qwen2' with hidden_size)")
        defaults = {f.name: f.default for f in fields(cls)}
        try:
            sizes = {k: int(llm.get(k, defaults[k]))
                     for k in ("speech_token_size", "llm_input_size", "llm_output_size")}
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{yaml_path}: llm section has a non-integer size ({e})") from e
        # upstream hard-codes <|endofprompt|> = 151646 (the published vocabulary's id); a smaller
        # test vocabulary cannot hold it, and then nothing is checked
        marker = ENDOFPROMPT_ID if version == 3 and int(qwen.get("vocab_size", 0)) > ENDOFPROMPT_ID else None
        cfg = cls(qwen=qwen, sampling=RASSettings.from_section(llm.get("sampling")), version=version,
                  endofprompt_id=marker, **sizes)
        hidden = qwen["hidden_size"]
        if not cfg.llm_input_size == cfg.llm_output_size == hidden:
            raise InvalidInputError(
                f"{yaml_path}: llm_input_size {cfg.llm_input_size} / llm_output_size {cfg.llm_output_size} "
                f"must both equal hidden_size {hidden} of {json_path}")
        return cfg


class QwenBackbone(nn.Module):
    """Holds ``Qwen2ForCausalLM`` as ``model`` (upstream's ``Qwen2Encoder`` layout). Only its
    embedding table and decoder stack run: CosyVoice2 never uses the text head (``lm_head``)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(config)

    def forward(self, embeds: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Embeddings [1, L, D] -> last hidden states [1, L, D] (after the final norm). With a
        cache, the embeddings continue what it holds and are appended to it."""
        out = self.model.model(inputs_embeds=embeds, use_cache=cache is not None, **{_CACHE_ARG: cache})
        return out.last_hidden_state


class CosyVoice2LM(nn.Module):
    """CosyVoice2's ``Qwen2LM``: text (+ voice prompt) -> speech tokens."""

    SOS = 0  # rows of llm_embedding (upstream's sos_eos and task_id)
    TASK_ID = 1

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        # registration order as upstream's, so state_dict() lists keys in the same order
        self.llm_embedding = nn.Embedding(2, cfg.llm_input_size)
        self.llm = QwenBackbone(cfg.qwen_config())
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.speech_vocab)
        self.speech_embedding = nn.Embedding(cfg.speech_vocab, cfg.llm_input_size)
        use_half_weight_linears(self)  # bf16 weights on a CPU: prefill in fp32 (see half_weights.py)

    # -- placement ------------------------------------------------------------------------------
    # Offloading backends may leave a weight on the meta device (streamed from disk) or partitioned
    # (ZeRO-3) until its module's forward runs: weights are only ever used through module calls, and
    # where inputs go is the execution device the runtime sets (else the first layer's).
    execution: tuple[torch.device, torch.dtype] | None = None

    def set_execution(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.execution = (torch.device(device), dtype)

    def _execution(self) -> tuple[torch.device, torch.dtype]:
        if self.execution is not None:
            return self.execution
        w = self.llm.model.model.layers[0].input_layernorm.weight
        return w.device, w.dtype

    def _to_backbone(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._execution()
        return x.to(device=device, dtype=dtype)

    def _lookup(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` on the backbone's device. The lookup runs where the table lives (the text
        table may stay on the CPU: 151936 x 896), only the rows move; a streamed table's hook brings
        its weight (and the ids) to the execution device."""
        weight_device = table.weight.device
        device = weight_device if weight_device.type != "meta" else self._execution()[0]
        return self._to_backbone(table(ids.to(device)))

    def tie_weights(self) -> None:
        """Make the (unused) text head share the text embedding table when the config ties them,
        so the table exists once, wherever it was placed. ``llm.pt`` holds the two as equal
        copies of one tied tensor."""
        qwen = self.llm.model
        if qwen.config.tie_word_embeddings:
            qwen.lm_head.weight = qwen.model.embed_tokens.weight

    # -- inputs ---------------------------------------------------------------------------------
    @staticmethod
    def _ids(value: IdsLike, name: str, limit: int) -> torch.Tensor:
        """A list/array/tensor of ids -> int64 [1, N] on the CPU, checked against [0, limit)."""
        try:
            ids = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{name}: expected a list of integer token ids ({e})") from e
        if ids.numel() == 0:
            return torch.zeros(1, 0, dtype=torch.long)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidInputError(f"{name}: token ids must be integers, got dtype {ids.dtype}")
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise InvalidInputError(
                f"{name}: expected a 1-D list of ids (or shape [1, N]), got shape {list(ids.shape)}")
        ids = ids.reshape(1, -1).to(device="cpu", dtype=torch.long)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= limit:
            raise InvalidInputError(f"{name}: ids must lie in [0, {limit - 1}], got values from {lo} to {hi}")
        return ids

    @torch.inference_mode()
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text ids [1, N] -> [1, N, D] on the backbone's device. The lookup runs where the table
        lives (it may stay on the CPU: 151936 x 896), only the rows move."""
        return self._lookup(self.llm.model.model.embed_tokens, ids)

    def _speech_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Speech ids [1, N] -> [1, N, D] on the backbone's device."""
        return self._lookup(self.speech_embedding, tokens)

    @torch.inference_mode()
    def input_embeds(self, text_ids: IdsLike, prompt_text_ids: IdsLike = (),
                     prompt_speech_tokens: IdsLike = ()) -> torch.Tensor:
        """[sos, prompt_text + text, task_id, prompt speech] embedded: [1, L, D] on the backbone's device."""
        vocab = self.llm.model.config.vocab_size
        text = torch.cat([self._ids(prompt_text_ids, "prompt_text_ids", vocab),
                          self._ids(text_ids, "text_ids", vocab)], dim=1)
        speech = self._ids(prompt_speech_tokens, "prompt_speech_tokens", self.cfg.speech_token_size)
        marks = self._marks()
        return torch.cat([marks[:, :1], self.embed_text(text), marks[:, 1:], self._speech_rows(speech)], dim=1)

    def _marks(self) -> torch.Tensor:
        """The sos and task-id embeddings, [1, 2, D] on the backbone's device."""
        return self._lookup(self.llm_embedding, torch.tensor([[self.SOS, self.TASK_ID]]))

    # -- forward ----------------------------------------------------------------------------------
    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm_decoder(self._to_backbone(hidden))

    @torch.inference_mode()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Full forward: embeddings [1, L, D] -> speech-token scores [1, L, speech_vocab]."""
        return self._scores(self.llm(embeds))

    def _next_logp(self, step_input: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run ``step_input`` [1, n, D] on top of ``cache``: log-probabilities [speech_vocab] of the
        next token (shaped as upstream computes them: decoder on [1, D], then log-softmax)."""
        hidden = self.llm(step_input, cache)
        return self._scores(hidden[:, -1]).float().log_softmax(dim=-1)[0]

    def _draw(self, logp: torch.Tensor, tokens: list[int], generator: torch.Generator, eos_allowed: bool) -> int:
        s = self.cfg.sampling
        logp = logp.to(generator.device)  # sampling runs where the generator lives
        for _ in range(_EOS_REDRAWS + 1):
            token = ras_sampling(logp, tokens, generator, s.top_p, s.top_k, s.win_size, s.tau_r)
            if eos_allowed or token != self.cfg.eos:
                return token
        raise RequestFailedError(f"the language model kept ending speech before the minimum length "
                                 f"({_EOS_REDRAWS + 1} draws after {len(tokens)} tokens): check the input text")

    @staticmethod
    def _length(text_len: int, ratio: float) -> int:
        # upstream multiplies an int32 length tensor by the ratio: float32 arithmetic, truncated
        return int(np.float32(text_len) * np.float32(ratio))

    def generate(self, text_ids: IdsLike, prompt_text_ids: IdsLike = (), prompt_speech_tokens: IdsLike = (), *,
                 generator: torch.Generator, min_tokens: int | None = None, max_tokens: int | None = None,
                 min_ratio: float = 2.0, max_ratio: float = 20.0) -> Iterator[int]:
        """Speech tokens, yielded one by one as they are sampled, until end of speech.

        Decoding runs at most ``max_tokens`` steps and cannot end before step ``min_tokens``
        (an end of speech drawn earlier is re-drawn); by default these are ``min_ratio`` and
        ``max_ratio`` times the number of TARGET text tokens (the prompt text does not count).
        Steps count as upstream counts them: the rare task/fill id a step may draw is dropped,
        so a run can yield fewer tokens than steps. Closing the iterator early frees its cache.
        Sampling runs on ``generator``'s device: a CPU generator serves a model on any device.
        """
        return self._decode(*self._plan(text_ids, prompt_text_ids, prompt_speech_tokens, generator, min_tokens,
                                        max_tokens, min_ratio, max_ratio), generator)

    def _plan(self, text_ids: IdsLike, prompt_text_ids: IdsLike, prompt_speech_tokens: IdsLike,
              generator: torch.Generator, min_tokens: int | None, max_tokens: int | None, min_ratio: float,
              max_ratio: float) -> tuple[torch.Tensor, int, int]:
        """Check :meth:`generate`'s arguments: (LM input embeddings, min length, max length)."""
        if not isinstance(generator, torch.Generator):
            raise InvalidInputError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        text = self._ids(text_ids, "text_ids", self.llm.model.config.vocab_size)
        if text.shape[1] == 0:
            raise InvalidInputError("text_ids is empty: the text to speak needs at least one token")
        for name, ratio in (("min_ratio", min_ratio), ("max_ratio", max_ratio)):
            if not (math.isfinite(ratio) and ratio >= 0):
                raise InvalidInputError(f"{name}={ratio!r}: expected a finite number >= 0")
        for name, count in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
                raise InvalidInputError(f"{name}={count!r}: expected an integer >= 0")
        if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
            raise InvalidInputError(f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}")
        min_len = self._length(text.shape[1], min_ratio) if min_tokens is None else min_tokens
        max_len = self._length(text.shape[1], max_ratio) if max_tokens is None else max_tokens
        return self.input_embeds(text, prompt_text_ids, prompt_speech_tokens), min_len, max_len

    def _new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.inference_mode()
    def _decode(self, embeds: torch.Tensor, min_len: int, max_len: int,
                generator: torch.Generator) -> Iterator[int]:
        cache = self._new_cache()
        tokens: list[int] = []
        step_input = embeds  # the whole prefix first, then one speech token per step
        try:
            for step in range(max_len):
                token = self._draw(self._next_logp(step_input, cache), tokens, generator, eos_allowed=step >= min_len)
                if token == self.cfg.eos:
                    return
                if token > self.cfg.eos:  # task/fill id: dropped, and (as upstream) the same input fed again
                    continue
                yield token
                tokens.append(token)
                step_input = self._speech_rows(torch.tensor([[token]]))
        finally:
            cache.reset()  # drop the keys/values now, even if the consumer keeps this iterator


class CosyVoice3LM(CosyVoice2LM):
    """CosyVoice3's ``CosyVoice3LM``: text (+ voice prompt) -> speech tokens (see the module notes)."""

    def __init__(self, cfg: LMConfig):
        nn.Module.__init__(self)
        if cfg.version != 3:
            raise InvalidInputError(f"CosyVoice3LM needs an LMConfig of version 3, got {cfg.version}")
        self.cfg = cfg
        # registration order as upstream's (no llm_embedding; the decoder has no bias)
        self.llm = QwenBackbone(cfg.qwen_config())
        self.llm_decoder = nn.Linear(cfg.llm_output_size, cfg.speech_vocab, bias=False)
        self.speech_embedding = nn.Embedding(cfg.speech_vocab, cfg.llm_input_size)
        use_half_weight_linears(self)  # bf16 weights on a CPU: prefill in fp32 (see half_weights.py)

    @property
    def sos(self) -> int:
        return self.cfg.speech_token_size

    @property
    def task_id(self) -> int:
        return self.cfg.speech_token_size + 2

    def _marks(self) -> torch.Tensor:
        """sos and task id are rows of ``speech_embedding`` here."""
        return self._speech_rows(torch.tensor([[self.sos, self.task_id]]))

    def generate(self, text_ids: IdsLike, prompt_text_ids: IdsLike = (), prompt_speech_tokens: IdsLike = (), *,
                 generator: torch.Generator, min_tokens: int | None = None, max_tokens: int | None = None,
                 min_ratio: float = 2.0, max_ratio: float = 20.0,
                 max_silent_run: int | None = MAX_SILENT_RUN, end_only_after_min: bool = False) -> Iterator[int]:
        """Speech tokens, yielded one by one as they are sampled, until an id >= 6561 is drawn.

        As :meth:`CosyVoice2LM.generate`, except: the minimum length masks only id 6561 (upstream's
        rule, see the module notes); and of each run of silence tokens (:data:`SILENT_TOKENS`) only
        the first ``max_silent_run`` are yielded (None: all, as upstream's LM alone yields them).
        ``end_only_after_min`` True masks every id >= 6561 before the minimum length, so that a run
        yields exactly ``min_tokens`` steps when ``min_tokens == max_tokens``: for fixed-length
        benchmarks on random weights, which otherwise stop at once (False: upstream's rule)."""
        if not isinstance(end_only_after_min, bool):
            raise InvalidInputError(f"end_only_after_min={end_only_after_min!r}: expected True or False")
        if max_silent_run is not None and (isinstance(max_silent_run, bool) or not isinstance(max_silent_run, int)
                                           or max_silent_run < 0):
            raise InvalidInputError(f"max_silent_run={max_silent_run!r}: expected an integer >= 0 or None")
        marker = self.cfg.endofprompt_id
        if marker is not None:
            vocab = self.llm.model.config.vocab_size
            ids = torch.cat([self._ids(prompt_text_ids, "prompt_text_ids", vocab),
                             self._ids(text_ids, "text_ids", vocab)], dim=1)
            if not bool((ids == marker).any()):
                raise InvalidInputError(
                    f"text_ids / prompt_text_ids: CosyVoice3 needs <|endofprompt|> (id {marker}) in the prompt "
                    "text or the text (e.g. an instruction, or 'You are a helpful assistant.', followed by it)")
        embeds, min_len, max_len = self._plan(text_ids, prompt_text_ids, prompt_speech_tokens, generator,
                                              min_tokens, max_tokens, min_ratio, max_ratio)
        tokens = self._decode(embeds, min_len, max_len, generator, end_only_after_min)
        return tokens if max_silent_run is None else _cap_silence(tokens, max_silent_run)

    @torch.inference_mode()
    def _decode(self, embeds: torch.Tensor, min_len: int, max_len: int,
                generator: torch.Generator, end_only_after_min: bool = False) -> Iterator[int]:
        s, first_stop = self.cfg.sampling, self.cfg.speech_token_size
        masked = slice(first_stop, None) if end_only_after_min else first_stop
        cache = self._new_cache()
        tokens: list[int] = []
        step_input = embeds
        try:
            for step in range(max_len):
                logp = self._next_logp(step_input, cache).to(generator.device)
                if step < min_len:
                    logp[masked] = -float("inf")  # upstream's ignore_eos: id 6561 only (else all stop ids)
                token = ras_sampling(logp, tokens, generator, s.top_p, s.top_k, s.win_size, s.tau_r,
                                     exclude_repeat=True)
                if token >= first_stop:  # eos, sos, task, fill or a reserved id: all stop
                    return
                yield token
                tokens.append(token)
                step_input = self._speech_rows(torch.tensor([[token]]))
        finally:
            cache.reset()


def _cap_silence(tokens: Iterator[int], max_run: int) -> Iterator[int]:
    """Leave out silence tokens past the first ``max_run`` of a run (upstream's llm_job filter)."""
    run = 0
    try:
        for token in tokens:
            run = run + 1 if token in SILENT_TOKENS else 0
            if run <= max_run:
                yield token
    finally:
        tokens.close()  # closing this iterator frees the decoder's cache at once


def model_class(cfg: LMConfig) -> type[CosyVoice2LM]:
    """The LM class of ``cfg.version``."""
    return CosyVoice3LM if cfg.version == 3 else CosyVoice2LM


def build(cfg: LMConfig, device: torch.device | str | None = None) -> CosyVoice2LM:
    """Construct (on ``device``, e.g. ``"meta"`` for sizing) without loading weights."""
    with torch.device(device or "cpu"):
        return model_class(cfg)(cfg)


def load(model_dir: str | Path, device: torch.device | str = "cpu", version: int | None = None) -> CosyVoice2LM:
    """The LM of a CosyVoice2/3 folder (see :meth:`LMConfig.from_folder`): its configs + ``llm.pt``
    loaded strictly, fp32."""
    model_dir = Path(model_dir)
    cfg = LMConfig.from_folder(model_dir, version)
    weights = model_dir / "llm.pt"
    if not weights.is_file():
        raise ModelNotFoundError(f"not a CosyVoice{cfg.version} model folder: missing {weights}")
    # parameters on meta (nothing random-initialised), buffers (rotary frequencies) real
    with init_empty_weights(include_buffers=False):
        model = model_class(cfg)(cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.to(device).eval()
