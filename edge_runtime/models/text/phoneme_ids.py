"""Phonemes -> model input ids with a voice's `phoneme_id_map`, the way Piper voices expect."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

BOS, EOS, PAD = "^", "$", "_"


class PhonemeIdMapper:
    """`^`, then every phoneme followed by the pad `_`, then `$`; unknown phonemes dropped."""

    def __init__(self, id_map: Mapping[str, Sequence[int]]) -> None:
        missing = [s for s in (BOS, EOS, PAD) if s not in id_map]
        if missing:
            raise ValueError(f"phoneme_id_map lacks the required symbols {missing}")
        self.id_map = {k: list(v) for k, v in id_map.items()}

    def to_ids(self, phonemes: Sequence[str]) -> list[int]:
        ids = [*self.id_map[BOS], *self.id_map[PAD]]
        dropped: list[str] = []
        for phoneme in phonemes:
            mapped = self.id_map.get(phoneme)
            if mapped is None:
                dropped.append(phoneme)
                continue
            ids.extend(mapped)
            ids.extend(self.id_map[PAD])
        ids.extend(self.id_map[EOS])
        if dropped:
            log.warning("dropped %d phoneme(s) this voice cannot speak: %r",
                        len(dropped), "".join(sorted(set(dropped))))
        return ids
