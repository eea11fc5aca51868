"""Checking and shaping what callers hand the flow (tokens, prompt mel, speaker embedding, noise)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edge_runtime.errors import InvalidInputError

# Upstream draws its flow noise once, randn(1, 80, 15000) after seeding 0: 300 s at 50 frames/s.
# Drawing this many frames from a generator seeded 0 gives exactly that buffer.
NOISE_FRAMES = 15000


def _tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name}: cannot read {type(value).__name__} as an array ({exc})") from None


def token_ids(name: str, value: Any, vocab: int, device: torch.device) -> torch.Tensor:
    """Speech tokens as a list, array or tensor of shape [N] or [1, N] -> int64 [1, N]."""
    t = _tensor(name, value)
    if t.numel() == 0:
        return torch.zeros(1, 0, dtype=torch.long, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidInputError(f"{name}: speech tokens must be integers, got {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise InvalidInputError(f"{name}: expected shape [N] or [1, N], got {list(t.shape)}")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise InvalidInputError(f"{name}: speech token {bad} is out of range; allowed 0..{vocab - 1}")
    return t.to(device=device, dtype=torch.long)[None]


def prompt_mel(value: Any, tokens: int, ratio: int, bins: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """The prompt's mel, [F, bins] or [1, F, bins] as upstream's frontend makes it -> [1, bins, F];
    F must be ``ratio`` frames per prompt token."""
    t = _tensor("prompt_feat", value)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != bins:
        raise InvalidInputError(f"prompt_feat: expected shape [frames, {bins}] or [1, frames, {bins}], "
                                f"got {list(t.shape)}")
    if t.shape[1] != ratio * tokens:
        raise InvalidInputError(f"prompt_feat: {t.shape[1]} frames for {tokens} prompt tokens; the flow needs "
                                f"{ratio} frames per token ({ratio * tokens})")
    if not t.dtype.is_floating_point or not torch.isfinite(t).all():
        raise InvalidInputError("prompt_feat: expected finite floating-point values")
    return t.to(device=device, dtype=dtype).transpose(1, 2)


def speaker_embedding(value: Any, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The speaker embedding (CAM++), [dim] or [1, dim] -> [1, dim]."""
    t = _tensor("embedding", value)
    if t.numel() != dim or t.dim() > 2 or (t.dim() == 2 and t.shape[0] != 1):
        raise InvalidInputError(f"embedding: expected shape [{dim}] or [1, {dim}], got {list(t.shape)}")
    if not t.dtype.is_floating_point or not torch.isfinite(t).all():
        raise InvalidInputError("embedding: expected finite floating-point values")
    return t.reshape(1, dim).to(device=device, dtype=dtype)


def noise_buffer(noise: torch.Tensor | None, generator: torch.Generator | None, bins: int,
                 dtype: torch.dtype, device: torch.device, frames: int = 0) -> torch.Tensor:
    """The flow noise [1, bins, N]: ``noise`` as given, else standard normal from ``generator`` (seed 0
    when neither is given: upstream's fixed buffer), N = max(NOISE_FRAMES, ``frames``)."""
    if noise is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        noise = torch.randn(1, bins, max(NOISE_FRAMES, frames), generator=gen, device=gen.device)
    elif not isinstance(noise, torch.Tensor) or noise.dim() != 3 or noise.shape[:2] != (1, bins):
        shape = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise InvalidInputError(f"noise: expected a tensor [1, {bins}, frames], got {shape}")
    elif not noise.dtype.is_floating_point:
        raise InvalidInputError(f"noise: expected floating-point values, got {noise.dtype}")
    return noise.to(device=device, dtype=dtype)


def noise_frames(noise: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Frames ``start..end`` of the noise buffer; an error naming both lengths when it is too short."""
    if noise.shape[2] < end:
        raise InvalidInputError(f"noise: covers {noise.shape[2]} frames; this needs {end} "
                                "(prompt + generated frames)")
    return noise[:, :, start:end]
