"""Where words are: normalised words back in the ORIGINAL text, and phonemes back in words.

Two alignments, both monotonic and both by sequence matching (difflib), so they need no hooks in
the normaliser or in espeak:

- `TextAlignment(original, normalised)`: the normaliser rewrites words ("$5" -> "5 dollars",
  "Dr." -> "doctor", "5°C" -> "5 degrees Celsius"); words it left alone match exactly, and each
  run of rewritten words maps onto the span of the original words it replaced. A period the
  normaliser consumed ("Dr." -> "doctor") belongs to the original word's span; one it kept (the
  sentence end in "and Co." -> "and company.") does not.
- `label_phonemes(phonemes, word_phonemes)`: espeak reads a sentence with its own word boundaries
  (it joins "in the" into `ɪnðə` and splits "123" into three words). Each word of the text is
  phonemised alone; the sentence's phoneme characters are matched against the concatenation, so
  every phoneme character gets the index of the text word it voices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

# What surrounds a word without being part of it.
_LEADING = "\"'`([{<\u201c\u2018\u00ab"
_TRAILING = "\"'`)]}>.,;:!?\u201d\u2019\u00bb"
_TOKEN_RE = re.compile(r"\S+")
# Phoneme characters that carry no segment of their own (stress, length, separators, pauses).
_STRESS = frozenset("\u02c8\u02cc")  # ˈ ˌ
_LENGTH = frozenset("\u02d0\u02d1")  # ː ˑ
_NOT_SEGMENTS = frozenset(" ,.;:!?\"'-()") | _STRESS | _LENGTH


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # character offsets into the text it came from
    end: int

    @property
    def key(self) -> str:
        return self.text.lower()


def words_of(text: str) -> list[Word]:
    """Whitespace-separated words with surrounding quotes, brackets and punctuation stripped;
    tokens that are only punctuation are not words."""
    words = []
    for match in _TOKEN_RE.finditer(text):
        start, end = match.span()
        while start < end and text[start] in _LEADING:
            start += 1
        while end > start and text[end - 1] in _TRAILING:
            end -= 1
        if start < end:
            words.append(Word(text[start:end], start, end))
    return words


class TextAlignment:
    """Normalised text -> spans of the original text it was made from."""

    def __init__(self, original: str, normalised: str, normalise: Callable[[str], str] | None = None) -> None:
        """`normalise`: how `normalised` was made (default: the English normaliser); used to share
        out a run of rewritten words among several original words ("555-1234 &")."""
        if normalise is None:
            from edge_runtime.models.text.normalize import normalize_text as normalise
        self.original, self.normalised, self.normalise = original, normalised, normalise
        self.source = words_of(original)
        self.target = words_of(normalised)
        # target word index -> (start, end) in the original
        self.spans: list[tuple[int, int] | None] = [None] * len(self.target)
        matcher = SequenceMatcher(None, [w.key for w in self.source], [w.key for w in self.target],
                                  autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op == "equal":
                for k in range(i2 - i1):
                    word = self.source[i1 + k]
                    self.spans[j1 + k] = (word.start, word.end)
            elif op == "replace":
                self._replace(i1, i2, j1, j2)
            # "delete": original words the normaliser dropped (nothing speaks them)
            # "insert": filled below from the neighbours
        self._fill_inserts()

    def _consumed_period(self, i: int, j: int) -> int:
        """The end of source word i, past its period when the normaliser dropped it for word j."""
        end = self.source[i].end
        if self.original[end:end + 1] == "." and self.normalised[self.target[j].end:self.target[j].end + 1] != ".":
            return end + 1
        return end

    def _shares(self, i1: int, i2: int, n: int) -> list[int] | None:
        """How many of the n rewritten words each original word i1..i2-1 became, when normalising
        each alone accounts for all n."""
        try:
            counts = [len(words_of(self.normalise(self.source[i].text))) for i in range(i1, i2)]
        except Exception:  # noqa: BLE001 - a heuristic: fall back to spreading in order
            return None
        return counts if sum(counts) == n else None

    def _replace(self, i1: int, i2: int, j1: int, j2: int) -> None:
        m, n = i2 - i1, j2 - j1
        shares = self._shares(i1, i2, n) if m > 1 and n > 1 and m != n else None
        owners = [i1 + i for i, count in enumerate(shares) for _ in range(count)] if shares else None
        for j in range(n):
            if owners is not None:
                lo = hi = owners[j]
            elif m == n:
                lo = hi = i1 + j
            elif m == 1 or n == 1:
                lo, hi = i1, i2 - 1
            else:  # several words rewritten into several: spread them in order
                lo = i1 + j * m // n
                hi = max(lo, i1 + (j + 1) * m // n - 1)
            self.spans[j1 + j] = (self.source[lo].start, self._consumed_period(hi, j2 - 1 if hi == i2 - 1 else j1 + j))

    def _fill_inserts(self) -> None:
        """A normalised word with no original counterpart (rare: "&" glued between words) takes
        its neighbour's span; with no original words at all, the whole original text."""
        whole = (0, len(self.original))
        previous = None
        for j, span in enumerate(self.spans):
            if span is None:
                if previous is None:
                    previous = next((s for s in self.spans[j:] if s is not None), whole)
                self.spans[j] = previous
            previous = self.spans[j]

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original span of the normalised words overlapping [start, end)."""
        hits = [self.spans[j] for j, w in enumerate(self.target) if w.start < end and start < w.end]
        if not hits:
            raise ValueError(f"no normalised word at {start}:{end} of {self.normalised!r}")
        return min(s for s, _ in hits), max(e for _, e in hits)


def _segments(phonemes: Sequence[str]) -> list[int]:
    return [k for k, ch in enumerate(phonemes) if ch not in _NOT_SEGMENTS]


def label_phonemes(phonemes: Sequence[str], word_phonemes: Sequence[Sequence[str]]) -> list[int]:
    """For each phoneme character of a sentence, the index of the word it voices (-1: spaces,
    punctuation, stress marks). `word_phonemes[i]` is word i phonemised alone.

    Matched characters take their word's index; the rest (context-dependent sounds, like the
    linking glide) take that of their neighbours in the same espeak word, preferring the one
    before. Labels never decrease along the sentence."""
    reference: list[str] = []
    owner: list[int] = []
    for i, word in enumerate(word_phonemes):
        for k in _segments(word):
            reference.append(word[k])
            owner.append(i)
    positions = _segments(phonemes)
    labels = [-1] * len(phonemes)
    if not positions or not reference:
        return labels
    matched: dict[int, int] = {}
    matcher = SequenceMatcher(None, [phonemes[k] for k in positions], reference, autojunk=False)
    for block in matcher.get_matching_blocks():
        for d in range(block.size):
            matched[positions[block.a + d]] = owner[block.b + d]
    # espeak words: runs of characters between spaces
    group, g = [], 0
    for ch in phonemes:
        group.append(g)
        if ch == " ":
            g += 1
    for k in positions:
        labels[k] = matched.get(k, -2)
    for idx, k in enumerate(positions):
        if labels[k] != -2:
            continue
        before = next((labels[p] for p in reversed(positions[:idx]) if group[p] == group[k] and labels[p] >= 0), None)
        after = next((labels[p] for p in positions[idx + 1:] if group[p] == group[k] and labels[p] >= 0), None)
        if before is None and after is None:
            before = next((labels[p] for p in reversed(positions[:idx]) if labels[p] >= 0), None)
            after = next((matched[p] for p in positions[idx + 1:] if p in matched), 0)
        labels[k] = before if before is not None else after
    running = 0
    for k in positions:  # matching blocks are in order; keep it so after the filling too
        running = max(running, labels[k])
        labels[k] = running
    # Stress marks belong to the segment after them, length marks to the one before.
    for k, ch in enumerate(phonemes):
        if ch in _STRESS:
            labels[k] = next((labels[p] for p in range(k + 1, len(phonemes)) if group[p] == group[k]
                              and labels[p] >= 0), -1)
        elif ch in _LENGTH:
            labels[k] = next((labels[p] for p in range(k - 1, -1, -1) if group[p] == group[k]
                              and labels[p] >= 0), -1)
    return labels
