"""One CosyVoice request (v2 or v3): LM tokens -> flow mel -> HiFT waveform, whole or streamed.

Streaming runs the LM and the vocoding in one thread: after each sampled token it checks whether the
next chunk (its hop + the flow's lookahead) is complete, and if so the flow computes only that chunk's
frames (earlier frames are final under the chunk-causal masks, so nothing is recomputed) and the
vocoder continues from its caches. Every cache and hop is the request's own; the only state kept
between requests is the voice prompt's flow work (below), bounded to one voice.

Randomness comes from the request's generator: the flow noise of the generated frames is drawn from
it first, then LM sampling and the vocoder's source draw from it as they go. The voice prompt's frames
take upstream's fixed noise (its buffer drawn after seed 0), so that the flow's work on a voice
prompt is the same for every request: the pipeline keeps it for the last voice prepared or used (one
slot, computed when the voice is prepared) and a request with that voice starts from it, its first
audio waiting only for the flow of its own hop.

Choice: the last streamed chunk is computed like the others (chunk-causal), not by upstream's full
re-run of the flow over every token (which makes the final chunk cost a whole offline flow, a stall
at the end of every streamed sentence). Streamed audio then equals upstream's streaming with its final
call made in streaming mode, chunk for chunk (tests/test_cosyvoice_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from edge_runtime.models.cosyvoice.flow.inputs import noise_buffer
from edge_runtime.models.cosyvoice.schedule import StreamSchedule

MAX_TOKEN_RATIO = 20  # upstream's max_token_text_ratio: the LM's own cap per text token
# Bytes a streamed request may keep of the flow's keys/values (per Euler step, both guidance branches:
# ~4.6 MB per frame in fp32 at the published size, half in bf16/fp16). Past it, later chunks recompute
# from the last cached frame on: exact, only slower.
FLOW_CACHE_BYTES = 1 << 30


def vocoder_of(hift) -> tuple[Any, Any]:
    """(stream class, offline vocode function) for the vocoder: CosyVoice3's causal HiFT or CosyVoice2's."""
    from edge_runtime.models.cosyvoice.hift_causal import CausalHiFTGenerator

    if isinstance(hift, CausalHiFTGenerator):
        from edge_runtime.models.cosyvoice.hift_causal_stream import CausalHiFTStream, vocode

        return CausalHiFTStream, vocode
    from edge_runtime.models.cosyvoice.hift_stream import HiFTStream, vocode

    return HiFTStream, vocode


class Pipeline:
    """The placed sub-models, shared by every request."""

    def __init__(self, lm, flow, hift, parts, device: torch.device, dtype: torch.dtype,
                 schedule: StreamSchedule | None = None, final_pass: str = "chunked",
                 flow_cache_bytes: int = FLOW_CACHE_BYTES) -> None:
        self.lm, self.flow, self.hift, self.parts = lm, flow, hift, parts
        self.hift_stream, self.vocode = vocoder_of(hift)
        self.device, self.dtype = device, dtype
        cfg = parts.flow
        self.schedule = schedule or StreamSchedule(lookahead=cfg.pre_lookahead_len, chunk=cfg.chunk_tokens)
        self.final_pass = final_pass
        self.mel_per_token = cfg.token_mel_ratio
        element = torch.tensor([], dtype=dtype).element_size()
        self.max_cache_frames = flow_cache_bytes // cfg.cache_bytes_per_frame(element)
        self.fixed_noise = noise_buffer(None, None, cfg.mel_bins, torch.float32, torch.device("cpu"))  # upstream's
        # (a voice's speech-token tensor, FlowStream after the voice prompt's own chunks): reused by
        # requests with that voice
        self.prompt_state: tuple[Any, Any] | None = None
        # Speech tokens per sentence at most (None: the LM's own limit, 20 per text token). Benchmarks
        # cap random-weight models, which never stop by themselves.
        self.token_cap: int | None = None

    def request(self, text_ids: list[int], prompt_text: list[int], prompt_speech: list[int], voice,
                generator: torch.Generator, *, max_tokens: int | None = None, min_tokens: int | None = None,
                noise: torch.Tensor | None = None) -> Request:
        return Request(self, text_ids, prompt_text, prompt_speech, voice, generator, max_tokens, min_tokens, noise)


class Request:
    def __init__(self, pipe: Pipeline, text_ids, prompt_text, prompt_speech, voice, generator,
                 max_tokens: int | None, min_tokens: int | None, noise: torch.Tensor | None) -> None:
        self.pipe, self.generator, self.voice = pipe, generator, voice
        self.text_ids, self.prompt_text, self.prompt_speech = text_ids, prompt_text, prompt_speech
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        tensors: dict[str, Any] = voice.tensors if voice is not None else {}
        dev = pipe.device
        self.flow_prompt = torch.as_tensor(tensors.get("speech_tokens", torch.zeros(0)), dtype=torch.long)
        self.flow_prompt = self.flow_prompt.reshape(1, -1).to(dev)
        feat = tensors.get("prompt_feat", torch.zeros(0, 80))
        self.prompt_feat = torch.as_tensor(feat, dtype=torch.float32).reshape(1, -1, 80).to(dev)
        emb = tensors.get("embedding")
        self.embedding = (torch.zeros(1, 192) if emb is None else torch.as_tensor(emb).reshape(1, -1)).to(dev)
        # the buffer covers flow.inputs.NOISE_FRAMES frames (300 s), prompt included; explicit noise
        # (tests) is used as given, and then no prompt state is shared
        self.shared_prompt = noise is None and voice is not None
        if noise is None:
            noise = noise_buffer(None, generator, pipe.parts.flow.mel_bins, torch.float32, torch.device("cpu"))
            prompt_frames = self.flow_prompt.shape[1] * pipe.mel_per_token
            noise[:, :, :prompt_frames] = pipe.fixed_noise[:, :, :prompt_frames]
        self.noise = noise
        self.room = self.noise.shape[2] // pipe.mel_per_token - self.flow_prompt.shape[1]
        self._closers: list[Any] = []

    # -- the LM ----------------------------------------------------------------------------------
    def tokens(self) -> Iterator[int]:
        caps = [c for c in (self.max_tokens, self.pipe.token_cap) if c is not None]
        if len(self.text_ids) * MAX_TOKEN_RATIO > self.room:
            caps.append(self.room)  # the flow's noise must cover every frame the LM may ask for
        cap = min(caps) if caps else None
        minimum = self.min_tokens if self.min_tokens is None or cap is None else min(self.min_tokens, cap)
        gen = self.pipe.lm.generate(self.text_ids, self.prompt_text, self.prompt_speech, generator=self.generator,
                                    min_tokens=minimum, max_tokens=cap)
        self._closers.append(gen)
        return gen

    # -- whole -------------------------------------------------------------------------------------
    def whole(self, speed: float = 1.0, tokens: Iterable[int] | None = None) -> np.ndarray:
        """The sentence's audio in one piece (full attention in the flow, as upstream offline);
        ``tokens`` replace the LM's (tests, voice conversion)."""
        with torch.inference_mode():
            tokens = list(self.tokens() if tokens is None else tokens)
            if not tokens:
                return np.zeros(0, np.float32)
            token_tensor = torch.tensor([tokens], dtype=torch.long)
            mel = self.pipe.flow.inference(token_tensor, self.flow_prompt, self.prompt_feat, self.embedding,
                                           noise=self.noise, streaming=False, finalize=True)
            wav = self.pipe.vocode(self.pipe.hift, mel.float(), generator=self.generator, speed=speed)
        return wav.reshape(-1).float().cpu().numpy()

    # -- streamed ------------------------------------------------------------------------------------
    def stream(self, tokens: Iterable[int] | None = None) -> Iterator[np.ndarray]:
        """Audio chunks as soon as each hop of tokens (+ lookahead) is sampled; ``tokens`` replace
        the LM's (tests)."""
        pipe = self.pipe
        look = pipe.schedule.lookahead
        hops = pipe.schedule.hops(self.flow_prompt.shape[1])
        hop = next(hops)
        seen: list[int] = []
        offset = 0  # tokens already vocoded
        with torch.inference_mode():
            flow = self._flow_stream()
            hift = pipe.hift_stream(pipe.hift, generator=self.generator)
            self._closers += [flow, hift]
            for token in self.tokens() if tokens is None else tokens:
                seen.append(int(token))
                if len(seen) - offset >= hop + look:
                    mel = flow.push(torch.tensor([seen[:offset + hop + look]]), finalize=False)
                    yield hift.push(mel.float(), finalize=False).reshape(-1).float().cpu().numpy()
                    offset += hop
                    hop = next(hops)
            if seen:
                mel = flow.push(torch.tensor([seen]), finalize=True)
                yield hift.push(mel.float(), finalize=True).reshape(-1).float().cpu().numpy()

    def _flow_stream(self):
        """A FlowStream past the voice prompt's own chunks: forked from the pipeline's slot when the
        last request used this voice, else computed (and kept in the slot for the next)."""
        from edge_runtime.models.cosyvoice.flow import FlowStream

        pipe = self.pipe
        slot = pipe.prompt_state
        if self.shared_prompt and slot is not None and slot[0] is self.voice.tensors.get("speech_tokens"):
            return slot[1].fork(self.noise)
        flow = FlowStream(pipe.flow, self.flow_prompt, self.prompt_feat, self.embedding, self.noise,
                          final_pass=pipe.final_pass, max_cache_frames=pipe.max_cache_frames)
        if self.shared_prompt and self.flow_prompt.shape[1] >= pipe.schedule.chunk + pipe.schedule.lookahead:
            pipe.prompt_state = None  # the previous voice's state goes before this one is made
            flow.push(torch.zeros(1, 0, dtype=torch.long))
            pipe.prompt_state = (self.voice.tensors.get("speech_tokens"), flow.fork())
        return flow

    def warm(self) -> None:
        """Compute the voice prompt's flow chunks now (voice preparation) for the requests to come."""
        with torch.inference_mode():
            self._flow_stream().close()

    def close(self) -> None:
        for item in self._closers:
            item.close()
        self._closers.clear()
