"""CosyVoice2/3's speech-token sampler: RAS (repetition-aware sampling) over a top-p/top-k nucleus.

Each step draws from the nucleus (the most likely tokens, at most ``top_k`` of them, taken until
their probabilities add up to ``top_p``); when the drawn token already occurs often enough in the
last ``win_size`` tokens (at least ``win_size * tau_r`` times), it is drawn again from the full
distribution, which breaks the loops a top-k sampler falls into.

Draws follow upstream's ``ras_sampling`` / ``nucleus_sampling`` exactly: the same probabilities,
the same stable descending sort, the same float32 running total deciding the nucleus size, one
``multinomial`` draw from the nucleus, then (on a repetition) one from the full softmax. A
``torch.Generator`` seeded ``s`` therefore yields the tokens upstream yields after
``torch.manual_seed(s)``. The global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError


@dataclass(frozen=True)
class RASSettings:
    """The ``sampling`` arguments of ``cosyvoice2.yaml`` / ``cosyvoice3.yaml`` (defaults: the published
    models' numbers, the same for both)."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p!r} (allowed: 0 < top_p <= 1)")
        if self.top_k < 1:
            problems.append(f"top_k={self.top_k!r} (allowed: an integer >= 1)")
        if self.win_size < 1:
            problems.append(f"win_size={self.win_size!r} (allowed: an integer >= 1)")
        if self.tau_r < 0.0:
            problems.append(f"tau_r={self.tau_r!r} (allowed: >= 0)")
        if problems:
            raise InvalidInputError("invalid RAS sampling settings: " + "; ".join(problems))

    @classmethod
    def from_section(cls, sampling: dict | None) -> RASSettings:
        """From the yaml's ``llm.sampling`` mapping (missing keys keep the published values)."""
        s, d = sampling or {}, cls()
        try:
            values = dict(top_p=float(s.get("top_p", d.top_p)), top_k=int(s.get("top_k", d.top_k)),
                          win_size=int(s.get("win_size", d.win_size)), tau_r=float(s.get("tau_r", d.tau_r)))
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"llm.sampling in the CosyVoice yaml: {s!r} has a non-numeric value "
                                    "(allowed: numbers for top_p, top_k, win_size, tau_r)") from e
        return cls(**values)


def nucleus_sampling(probs: torch.Tensor, generator: torch.Generator, top_p: float = 0.8, top_k: int = 25) -> int:
    """One token drawn from the nucleus of ``probs`` (1-D, summing to 1).

    The nucleus is the longest prefix of the stably sorted (descending) probabilities such that
    every member was admitted while the running total was still below ``top_p``, capped at
    ``top_k`` members; the draw is ``multinomial`` over the members' (unnormalised) values.
    """
    sorted_probs, order = probs.sort(descending=True, stable=True)
    head = sorted_probs[:top_k]
    # Upstream adds the probabilities one float32 addition at a time; numpy's cumsum accumulates
    # sequentially in the array's dtype (torch's CPU cumsum accumulates in float64), so the
    # totals, and the nucleus size near the top_p boundary, come out bit for bit the same.
    running = np.cumsum(head.cpu().numpy())
    # Totals never decrease, so "admitted while below top_p" is a count: member 0 always, member
    # i >= 1 when the total of members 0..i-1 is below top_p.
    size = 1 + int(np.count_nonzero(running[:-1] < top_p))
    pick = head[:size].multinomial(1, replacement=True, generator=generator)
    return int(order[pick])


def random_sampling(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn from the full distribution ``probs``."""
    return int(probs.multinomial(1, replacement=True, generator=generator))


def ras_sampling(logits_1d: torch.Tensor, recent_tokens: Sequence[int], generator: torch.Generator,
                 top_p: float = 0.8, top_k: int = 25, win_size: int = 10, tau_r: float = 0.1,
                 exclude_repeat: bool = False) -> int:
    """One speech token from scores ``logits_1d`` [V] (logits or log-probabilities: both give the
    same softmax; upstream passes log-probabilities) given the tokens decoded so far.

    ``exclude_repeat``: the re-draw after a repetition cannot return the repeated token (its score
    set to -inf first), as in the upstream version CosyVoice3 ships with; CosyVoice2's reference
    re-draws from the full distribution."""
    probs = logits_1d.softmax(dim=0)
    token = nucleus_sampling(probs, generator, top_p, top_k)
    if recent_tokens[-win_size:].count(token) >= win_size * tau_r:
        if exclude_repeat:
            masked = logits_1d.clone()
            masked[token] = -float("inf")
            probs = masked.softmax(dim=0)
        token = random_sampling(probs, generator)
    return token
