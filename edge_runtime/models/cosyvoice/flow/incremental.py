"""What chunk-by-chunk computation keeps between chunks, and the layers that read it.

Under chunk-causal attention (a frame sees every frame of its own and earlier chunks) and causal
convolutions, the frames of a finished chunk never change. Computing only a new chunk then needs, per
layer, what the earlier frames leave behind: the last ``kernel - 1`` inputs of each causal convolution
and the keys/values of each attention layer. :class:`LayerState` holds both, keyed by the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVStore:
    """Keys and values of the finished frames for one attention layer, [B, frames, H, D] (frame-major,
    so a chunk is appended with contiguous copies).

    Capacity doubles when full (at most ``max_frames``, when given), so appending a chunk does not
    copy the whole history each time."""

    def __init__(self, max_frames: int | None = None) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0
        self.max_frames = max_frames
        self._shared = False  # the tensors are another store's too (see copy)

    @property
    def nbytes(self) -> int:
        return 0 if self._k is None else 2 * self._k.numel() * self._k.element_size()

    def extended(self, k: torch.Tensor, v: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """History + the new ``k``/``v`` [B, T, H, D] along the frame axis; with ``keep`` the new ones
        join the history."""
        n = self.length
        if not keep:
            if n == 0:
                return k, v
            return torch.cat([self._k[:, :n], k], dim=1), torch.cat([self._v[:, :n], v], dim=1)
        end = n + k.shape[1]
        if self._k is None or self._k.shape[1] < end or self._shared:
            doubled = 2 * (0 if self._k is None else self._k.shape[1])
            if self.max_frames is not None:
                doubled = min(doubled, self.max_frames)
            self._grow(k, v, max(end, doubled))
            self._shared = False
        self._k[:, n:end] = k
        self._v[:, n:end] = v
        self.length = end
        return self._k[:, :end], self._v[:, :end]

    def copy(self) -> KVStore:
        """An independent copy of the history. Copy on write: both share the tensors until either
        keeps new frames, which then moves its history into a buffer of its own."""
        out = KVStore(self.max_frames)
        out._k, out._v, out.length = self._k, self._v, self.length
        out._shared = self._shared = self._k is not None
        return out

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        b, _, h, d = k.shape
        grown_k, grown_v = k.new_empty(b, capacity, h, d), v.new_empty(b, capacity, h, d)
        if self.length:
            grown_k[:, :self.length] = self._k[:, :self.length]
            grown_v[:, :self.length] = self._v[:, :self.length]
        self._k, self._v = grown_k, grown_v


class LayerState:
    """Per-layer memory of one incremental pass (e.g. one Euler step): conv left contexts and KV stores.

    ``keep=False`` uses the memory without adding the new frames to it (for frames computed again
    later, e.g. past a cache limit, ``max_frames``)."""

    def __init__(self, max_frames: int | None = None) -> None:
        self.keep = True
        self.max_frames = max_frames
        self._left: dict[nn.Module, torch.Tensor] = {}
        self._kv: dict[nn.Module, KVStore] = {}

    @property
    def nbytes(self) -> int:
        left = sum(t.numel() * t.element_size() for t in self._left.values())
        return left + sum(s.nbytes for s in self._kv.values())

    def copy(self) -> LayerState:
        """An independent copy: what later frames add to it leaves this one as it is."""
        out = LayerState(self.max_frames)
        out.keep = self.keep
        out._left = dict(self._left)  # never written in place: replaced by new tensors
        out._kv = {layer: store.copy() for layer, store in self._kv.items()}
        return out

    def padded(self, conv: nn.Module, x: torch.Tensor, context: int) -> torch.Tensor:
        """``x`` [B, T, C] preceded by the ``context`` frames before it (zeros at the start)."""
        left = self._left.get(conv)
        if left is None:
            left = x.new_zeros(x.shape[0], context, x.shape[2])
        full = torch.cat([left, x], dim=1)
        if self.keep:  # a copy, so that the whole padded input is not kept alive
            self._left[conv] = full[:, full.shape[1] - context:].clone()
        return full

    def keys_values(self, attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new frames' keys/values [B, T, H, D] -> all frames' so far (see :meth:`KVStore.extended`)."""
        store = self._kv.get(attn)
        if store is None:
            store = self._kv[attn] = KVStore(self.max_frames)
        return store.extended(k, v, self.keep)


def windowed_linear(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A stride-1, unpadded Conv1d applied to channels-last ``x`` [B, T + k - 1, Cin] -> [B, T, Cout],
    as one matrix product over the k-frame windows (the weight [Cout, Cin, k] flattens to the same
    (channel, tap) order as a window, so no weight copy is needed)."""
    cout, cin, k = conv.weight.shape
    windows = x.unfold(1, k, 1)  # [B, T, Cin, k], a view
    return F.linear(windows.reshape(x.shape[0], -1, cin * k), conv.weight.view(cout, cin * k), conv.bias)


class WindowedConv1d(nn.Conv1d):
    """An unpadded stride-1 Conv1d over channels-last [B, T + k - 1, Cin] -> [B, T, Cout]. Its weight is
    used only inside its own forward, where an offloading backend's hook has brought it in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return windowed_linear(x, self)


class CausalConv1d(nn.Conv1d):
    """Conv1d over channels-last [B, T, C] that sees only the current and past frames (left padding
    ``kernel - 1``: zeros at the start, or the frames a :class:`LayerState` kept)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1

    def forward(self, x: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        padded = F.pad(x, (0, 0, self.context, 0)) if state is None else state.padded(self, x, self.context)
        return windowed_linear(padded, self)


def chunk_mask(start: int, queries: int, keys: int, chunk: int, device: torch.device) -> torch.Tensor | None:
    """Attention mask [queries, keys] (True = attend) for query positions ``start..start+queries`` over
    key positions ``0..keys``: a position sees everything up to the end of its chunk (chunks counted
    from position 0). ``None`` when nothing is masked."""
    if (start // chunk + 1) * chunk >= keys:  # even the first query's chunk reaches the last key
        return None
    pos = torch.arange(start, start + queries, device=device)
    ends = (pos // chunk + 1) * chunk
    return torch.arange(keys, device=device)[None, :] < ends[:, None]
