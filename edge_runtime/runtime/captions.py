"""Captions from word timings: SRT and WebVTT.

Cues group consecutive words (a new cue after a sentence end, a long pause, or when the line would
grow too long); each cue shows the ORIGINAL text of its words ("$5", not "5 dollars"), from the
first word's start to the last word's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.base import WordTiming

MAX_CUE_CHARS = 42  # a common one-line subtitle limit
MAX_CUE_SECONDS = 5.0
PAUSE_SECONDS = 0.6  # a silence this long starts a new cue
CAPTION_FORMATS = ("srt", "vtt")
_OPENING = "\"'([{\u201c\u2018\u00ab"
_CLOSING = "\"')]}.,;:!?\u201d\u2019\u00bb"


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


def cues(text: str, words: Sequence[WordTiming], max_chars: int = MAX_CUE_CHARS,
         max_seconds: float = MAX_CUE_SECONDS) -> list[Cue]:
    """Group timed words (with char offsets into `text`) into caption cues."""
    groups: list[list[WordTiming]] = []
    for word in words:
        if groups:
            group = groups[-1]
            first, last = group[0], group[-1]
            if word.start_char == last.start_char and word.end_char == last.end_char:
                group.append(word)  # another spoken word of the same written one ("$5")
                continue
            between = text[last.end_char:word.start_char] if last.end_char >= 0 else ""
            too_long = (word.end_char - first.start_char > max_chars
                        or word.end_s - first.start_s > max_seconds)
            sentence_end = any(ch in ".?!" for ch in between)
            if not (too_long or sentence_end or word.start_s - last.end_s >= PAUSE_SECONDS):
                group.append(word)
                continue
        groups.append([word])
    out = []
    for group in groups:
        first, last = group[0], group[-1]
        if first.start_char >= 0 and last.end_char >= 0:
            begin, end = first.start_char, last.end_char
            while begin > 0 and text[begin - 1] in _OPENING:
                begin -= 1
            while end < len(text) and text[end] in _CLOSING:  # the sentence's own punctuation
                end += 1
            caption = " ".join(text[begin:end].split())
        else:
            caption = " ".join(w.word for w in group)
        out.append(Cue(first.start_s, max(last.end_s, first.start_s + 0.001), caption))
    return out


def _stamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _ordered(items: Sequence[Cue]) -> list[tuple[str, str, str]]:
    """(start, end, text) stamps with start < end after rounding to milliseconds."""
    rows = []
    for cue in items:
        start, end = round(cue.start_s, 3), round(cue.end_s, 3)
        rows.append((start, max(end, start + 0.001), cue.text))
    return rows


def to_srt(items: Sequence[Cue]) -> str:
    blocks = [f"{n}\n{_stamp(s, ',')} --> {_stamp(e, ',')}\n{t}\n" for n, (s, e, t) in enumerate(_ordered(items), 1)]
    return "\n".join(blocks)


def to_vtt(items: Sequence[Cue]) -> str:
    blocks = [f"{n}\n{_stamp(s, '.')} --> {_stamp(e, '.')}\n{t.replace('-->', '->')}\n"
              for n, (s, e, t) in enumerate(_ordered(items), 1)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def caption_format(path: Path) -> str:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in CAPTION_FORMATS:
        raise InvalidInputError(f"--captions {path}: unknown caption format {fmt or '(no suffix)'!r}; "
                                f"allowed: .srt or .vtt")
    return fmt


def write_captions(path: Path, text: str, words: Sequence[WordTiming]) -> Path:
    """Write SRT or WebVTT (by the suffix of `path`) for timed words of `text`."""
    fmt = caption_format(path)
    items = cues(text, words)
    Path(path).write_text(to_srt(items) if fmt == "srt" else to_vtt(items), encoding="utf-8")
    return Path(path)
