"""Linear layers whose weights may be half precision on a CPU that lacks native half-precision math.

Decoding one token multiplies a single row by every weight: bound by memory bandwidth, so bf16
weights (half the bytes) make it ~2x faster even when the CPU converts them on the fly. A prompt's
prefill multiplies hundreds of rows: bound by arithmetic, and emulated bf16 matrix products are
~4x slower than fp32 ones here (240 positions of CosyVoice2's LM: 9.5 s against 2.1 s). So a
multi-row input on the CPU is computed in fp32 from the upcast weights (a transient copy of one
layer) and returned in the input's dtype; one row, or any input on a GPU, runs as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.bfloat16, torch.float16)


class HalfWeightLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) with the CPU prefill rule above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype in _HALF and x.device.type == "cpu" and x.numel() > x.shape[-1]:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), w.float(), bias).to(x.dtype)
        return super().forward(x)


def use_half_weight_linears(module: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside ``module`` a :class:`HalfWeightLinear` (in place, before any
    offloading hook wraps a forward)."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = HalfWeightLinear
    return module
