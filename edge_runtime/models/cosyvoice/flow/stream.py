"""Streaming the flow chunk by chunk, computing each frame once.

Upstream's streaming re-runs the whole flow over all tokens so far for every chunk (its cost grows
with the square of the length) and keeps only the new frames. Under the chunk-causal masks and
causal convolutions the frames of finished chunks never change, so :class:`FlowStream` computes
only the new chunks: the encoder continues from the keys/values and conv context its earlier
tokens left, and so does the estimator, once per Euler step (both guidance branches).

Chunks are counted from the first prompt token (25 tokens = 50 frames). A non-final push produces
the frames of every whole chunk whose 3 look-ahead tokens are known; the frames of the prompt's own
chunks are computed too (not returned), so pushing before any token exists does that work early.

Memory: the estimator's keys/values cost ``FlowConfig.cache_bytes_per_frame`` per frame of
history (prompt frames included; 4.6 MB at CosyVoice2's published size in fp32, 3.6 MB for
CosyVoice3's DiT, half that in fp16/bf16).
``max_cache_frames`` bounds it: past that many frames the keys/values are not kept and every later
push recomputes the estimator from that frame on (exact, but the cost grows again with length).

Finalising: upstream's last chunk runs the whole flow offline (full attention, not chunk-causal)
and returns its new frames; ``final_pass="full"`` (the default) does the same and equals upstream.
``final_pass="chunked"`` finishes incrementally with the chunk-causal masks instead (no full pass:
the last chunk costs like any other) and equals ``inference(streaming=True)`` over all tokens.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice.flow import inputs
from edge_runtime.models.cosyvoice.flow.incremental import LayerState, chunk_mask
from edge_runtime.models.cosyvoice.flow.model import TokenFlow, prompt_condition


class FlowStream:
    """One streamed request: :meth:`push` all tokens so far, get the mel of the frames that became final."""

    def __init__(self, flow: TokenFlow, prompt_tokens: Any, prompt_feat: Any, embedding: Any,
                 noise: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 final_pass: Literal["full", "chunked"] = "full", max_cache_frames: int | None = None) -> None:
        if final_pass not in ("full", "chunked"):
            raise InvalidInputError(f"final_pass: {final_pass!r}; allowed: 'full', 'chunked'")
        if max_cache_frames is not None and max_cache_frames < 0:
            raise InvalidInputError(f"max_cache_frames: {max_cache_frames}; allowed: None or >= 0")
        cfg = flow.cfg
        device, dtype = flow.placement
        self._flow, self._cfg = flow, cfg
        self._final_pass = final_pass
        self._prompt = inputs.token_ids("prompt_tokens", prompt_tokens, cfg.vocab_size, device)
        self._prompt_mel = inputs.prompt_mel(prompt_feat, self._prompt.shape[1], cfg.token_mel_ratio,
                                             cfg.mel_bins, dtype, device)
        self._embedding = inputs.speaker_embedding(embedding, cfg.spk_embed_dim, torch.float32, device)
        self._noise = inputs.noise_buffer(noise, generator, cfg.mel_bins, flow.decoder.solver_dtype or dtype, device)
        # keys/values are kept up to a whole chunk, so that every cached frame is final
        limit = None if max_cache_frames is None else max_cache_frames // cfg.chunk_frames * cfg.chunk_frames
        self._cache_limit = math.inf if limit is None else limit
        with torch.inference_mode():
            self._speaker = flow.speaker(self._embedding)
            self._plan = flow.decoder.plan(dtype, device)
        self._tokens = self._prompt[:, :0]
        self._encoder = LayerState()
        self._steps = [LayerState(limit) for _ in range(cfg.n_timesteps)]
        self._encoded = 0  # tokens (prompt included) whose encoder output is final
        self._mu = self._prompt_mel[:, :, :0]  # the encoder's mel of those tokens
        self._cached = 0  # frames whose estimator keys/values the step states hold
        self._emitted = self._prompt_mel.shape[2]  # frames returned so far (the prompt's count as done)
        self._closed = False

    @property
    def cache_nbytes(self) -> int:
        """Bytes held for later chunks (keys/values and conv context of the encoder and estimator)."""
        return self._encoder.nbytes + sum(state.nbytes for state in self._steps)

    @torch.inference_mode()
    def push(self, tokens: Any, finalize: bool = False) -> torch.Tensor:
        """All speech tokens generated so far ([N] or [1, N], extending the previous push) -> the mel of
        the frames that became final since the previous push, [1, 80, frames] (fp32; may be empty).
        ``finalize``: no more tokens will come; the remaining frames are produced."""
        if self._closed:
            raise InvalidInputError("FlowStream.push: the stream is finalised or closed")
        cfg = self._cfg
        device, _ = self._flow.placement
        tokens = inputs.token_ids("tokens", tokens, cfg.vocab_size, device)
        seen = self._tokens.shape[1]
        if tokens.shape[1] < seen or not torch.equal(tokens[:, :seen], self._tokens):
            raise InvalidInputError(f"tokens: must extend the {seen} tokens pushed before (all tokens so far)")
        self._tokens = tokens
        if finalize and self._final_pass == "full":
            mel = self._flow.inference(tokens, self._prompt, self._prompt_mel.transpose(1, 2), self._embedding,
                                       noise=self._noise)
            mel = mel[:, :, self._emitted - self._prompt_mel.shape[2]:]
            self.close()
            return mel
        seq = torch.cat([self._prompt, tokens], dim=1)
        look = cfg.pre_lookahead_len
        end = seq.shape[1] if finalize else (seq.shape[1] - look) // cfg.chunk_tokens * cfg.chunk_tokens
        if end > self._encoded:
            mu = self._flow.encode(seq[:, self._encoded:end], seq[:, end:end + (0 if finalize else look)],
                                   chunked=True, start=self._encoded, state=self._encoder)
            self._mu = torch.cat([self._mu, mu], dim=2)
            self._encoded = end
        mel = self._estimate(end * cfg.token_mel_ratio)
        if finalize:
            self.close()
        return mel

    def fork(self, noise: torch.Tensor | None = None) -> FlowStream:
        """An independent stream continuing from this one's state (e.g. a voice prompt's chunks,
        computed once and reused by every request with that voice). ``noise`` replaces the buffer for
        the frames not computed yet; the computed frames must have used the same noise."""
        if self._closed:
            raise InvalidInputError("FlowStream.fork: the stream is finalised or closed")
        out = copy.copy(self)
        out._encoder = self._encoder.copy()
        out._steps = [state.copy() for state in self._steps]
        if noise is not None:
            device, dtype = self._flow.placement
            out._noise = inputs.noise_buffer(noise, None, self._cfg.mel_bins, self._flow.decoder.solver_dtype or dtype,
                                             device)
        return out

    def close(self) -> None:
        """Free the caches; later pushes are refused."""
        self._closed = True
        self._encoder = LayerState()
        self._steps = []

    def _estimate(self, end: int) -> torch.Tensor:
        """Mel of frames ``emitted..end``, after bringing the step caches as far as the limit allows."""
        pieces, first = [], self._cached
        keep_to = min(end, self._cache_limit)
        if keep_to > self._cached:
            pieces.append(self._solve(self._cached, keep_to, keep=True))
            self._cached = keep_to
        if end > max(self._cached, self._emitted):  # past the cache limit: recomputed on every push
            pieces.append(self._solve(self._cached, end, keep=False))
        if end <= self._emitted:
            return self._mu.new_zeros(1, self._cfg.mel_bins, 0).float()
        mel = torch.cat(pieces, dim=2)[:, :, self._emitted - first:]
        self._emitted = end
        return mel.float()

    def _solve(self, start: int, end: int, keep: bool) -> torch.Tensor:
        for state in self._steps:
            state.keep = keep
        return self._flow.decoder.solve(
            inputs.noise_frames(self._noise, start, end), self._mu[:, :, start:end], self._speaker,
            prompt_condition(self._prompt_mel, start, end), plan=self._plan, states=self._steps,
            mask=chunk_mask(start, end - start, end, self._cfg.chunk_frames, self._mu.device))
