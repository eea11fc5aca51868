"""When a streamed CosyVoice2 request vocodes: the token hop, per request.

The flow's attention is chunk-causal over chunks of `chunk` tokens counted from the start of the
sequence, which begins with the voice prompt's tokens. The first hop is padded so that prompt + first
hop fill whole chunks; later hops are whole chunks too, so every chunk the flow computes is final.
The hop starts at 25 tokens (first audio early) and doubles up to 100 (fewer, larger flow calls).

Upstream keeps the hop on the model object, grows it in place and never resets it, so from the third
request on the first chunk waits for 100 tokens (~4 s of audio). Here a schedule is a value and each
request iterates its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSchedule:
    first_hop: int = 25  # tokens of the first chunk (before the prompt padding)
    max_hop: int = 100
    growth: int = 2
    lookahead: int = 3  # tokens the flow's pre-lookahead layer reads past a chunk's end
    chunk: int = 25  # the flow's attention chunk, in tokens

    def __post_init__(self) -> None:
        for name in ("first_hop", "max_hop"):
            if getattr(self, name) % self.chunk:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of the flow's chunk ({self.chunk})")

    def hops(self, prompt_tokens: int) -> Iterator[int]:
        """Token counts of successive chunks for a voice prompt of ``prompt_tokens`` tokens."""
        pad = math.ceil(prompt_tokens / self.chunk) * self.chunk - prompt_tokens
        yield self.first_hop + pad
        hop = self.first_hop
        while True:
            hop = min(self.max_hop, hop * self.growth)
            yield hop
