"""The prepared-voice type shared by model families (which make them) and the runtime (which caches
and stores them): a leaf below both, so neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)  # identity equality: comparing tensor dicts is ambiguous
class PreparedVoice:
    """A voice prompt in the form a model consumes. Treat as read-only once cached: the cache hands
    the same object to every caller. `tensors` values are torch tensors or numpy arrays."""

    tensors: dict[str, Any]
    model_id: str
    sample_rate: int
    transcript: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable model-specific facts

    @property
    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.tensors.values())
