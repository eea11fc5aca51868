"""One CosyVoice2 request: LM tokens -> flow mel -> HiFT waveform, whole or streamed.

Streaming runs the LM and the vocoding in one thread: after each sampled token it checks whether the
next chunk (its hop + the flow's lookahead) is complete, and if so the flow computes only that chunk's
frames (its earlier frames are final under the chunk-causal masks, so nothing is recomputed) and the
vocoder continues from its caches. All state is the request's: nothing carries over to the next one.
Randomness (LM sampling, flow noise, the vocoder's source) comes from the request's generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from edge_runtime.models.cosyvoice.schedule import StreamSchedule

MAX_TOKEN_RATIO = 20  # upstream's max_token_text_ratio: the LM's own cap per text token


class Pipeline:
    """The placed sub-models, shared by every request."""

    def __init__(self, lm, flow, hift, parts, device: torch.device, dtype: torch.dtype,
                 schedule: StreamSchedule | None = None) -> None:
        self.lm, self.flow, self.hift, self.parts = lm, flow, hift, parts
        self.device, self.dtype = device, dtype
        self.schedule = schedule or StreamSchedule(lookahead=parts.flow.pre_lookahead_len)
        self.mel_per_token = parts.flow.token_mel_ratio
        # Speech tokens per sentence at most (None: the LM's own limit, 20 per text token). Benchmarks
        # cap random-weight models, which never stop by themselves.
        self.token_cap: int | None = None

    def request(self, text_ids: list[int], prompt_text: list[int], prompt_speech: list[int],
                voice, generator: torch.Generator, max_tokens: int | None = None,
                min_tokens: int | None = None) -> Request:
        return Request(self, text_ids, prompt_text, prompt_speech, voice, generator, max_tokens, min_tokens)


class Request:
    def __init__(self, pipe: Pipeline, text_ids, prompt_text, prompt_speech, voice, generator,
                 max_tokens: int | None, min_tokens: int | None) -> None:
        self.pipe, self.generator = pipe, generator
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
        self._closers: list[Any] = []

    # -- the LM ----------------------------------------------------------------------------------
    def tokens(self) -> Iterator[int]:
        from edge_runtime.models.cosyvoice.flow.inputs import NOISE_FRAMES

        # the flow's noise covers NOISE_FRAMES frames (upstream's fixed buffer: 300 s), prompt included
        room = NOISE_FRAMES // self.pipe.mel_per_token - self.flow_prompt.shape[1]
        caps = [c for c in (self.max_tokens, self.pipe.token_cap) if c is not None]
        if self.max_tokens is None and len(self.text_ids) * MAX_TOKEN_RATIO <= room:
            cap = min(caps) if caps else None  # the LM's own limit fits
        else:
            cap = min([*caps, room])
        minimum = self.min_tokens if self.min_tokens is None or cap is None else min(self.min_tokens, cap)
        gen = self.pipe.lm.generate(self.text_ids, self.prompt_text, self.prompt_speech, generator=self.generator,
                                    min_tokens=minimum, max_tokens=cap)
        self._closers.append(gen)
        return gen

    # -- whole -------------------------------------------------------------------------------------
    def whole(self, speed: float = 1.0) -> np.ndarray:
        with torch.inference_mode():
            tokens = list(self.tokens())
            if not tokens:
                return np.zeros(0, np.float32)
            token_tensor = torch.tensor([tokens], dtype=torch.long, device=self.pipe.device)
            mel = self.pipe.flow.inference(token_tensor, self.flow_prompt, self.prompt_feat, self.embedding,
                                           generator=self.generator, streaming=False, finalize=True)
            from edge_runtime.models.cosyvoice.hift_stream import vocode

            wav = vocode(self.pipe.hift, mel.float(), generator=self.generator, speed=speed)
        return wav.reshape(-1).float().cpu().numpy()

    # -- streamed ------------------------------------------------------------------------------------
    def stream(self) -> Iterator[np.ndarray]:
        from edge_runtime.models.cosyvoice.flow import FlowStream
        from edge_runtime.models.cosyvoice.hift_stream import HiFTStream

        pipe = self.pipe
        look = pipe.schedule.lookahead
        hops = pipe.schedule.hops(self.flow_prompt.shape[1])
        hop = next(hops)
        tokens: list[int] = []
        offset = 0  # tokens already vocoded
        with torch.inference_mode():
            flow = FlowStream(pipe.flow, self.flow_prompt, self.prompt_feat, self.embedding, generator=self.generator)
            hift = HiFTStream(pipe.hift, generator=self.generator)
            self._closers += [flow, hift]
            for token in self.tokens():
                tokens.append(token)
                if len(tokens) - offset >= hop + look:
                    chunk = torch.tensor([tokens[:offset + hop + look]], dtype=torch.long, device=pipe.device)
                    mel = flow.push(chunk, finalize=False)
                    yield hift.push(mel.float(), finalize=False).reshape(-1).float().cpu().numpy()
                    offset += hop
                    hop = next(hops)
            if tokens:
                chunk = torch.tensor([tokens], dtype=torch.long, device=pipe.device)
                mel = flow.push(chunk, finalize=True)
                yield hift.push(mel.float(), finalize=True).reshape(-1).float().cpu().numpy()

    def close(self) -> None:
        for item in self._closers:
            item.close()
        self._closers.clear()
