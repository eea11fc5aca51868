"""Split normalised text into sentences, and over-long sentences into clause groups.

Sentences are the unit of streaming: the first one is synthesised while the rest wait, so a
long run-on sentence is cut at clause punctuation (then at spaces) to keep the first audio early
and every forward pass bounded.
"""

from __future__ import annotations

from edge_runtime.policy.planner.budget import MAX_SENTENCE_CHARS

import re

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Join consecutive pieces with spaces into chunks of at most max_chars (a longer piece alone)."""
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Clauses packed up to max_chars; a clause still too long is packed word by word."""
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        pieces.extend([clause] if len(clause) <= max_chars else _pack(clause.split(" "), max_chars))
    return _pack(pieces, max_chars)


# The engine synthesises one sentence at a time; a longer one is split at clauses. The planner
# budgets one sentence of this length (plus the voice prompt), not the whole request text.


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """Sentences of `text` (already normalised), none longer than `max_chars`."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            sentence = " ".join(sentence.split())
            if not sentence:
                continue
            out.extend(_split_long(sentence, max_chars) if len(sentence) > max_chars else [sentence])
    return out
