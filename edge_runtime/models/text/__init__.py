"""Text front end: normalise -> split into sentences -> phonemise -> ids."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from edge_runtime.models.text.normalize import normalize_text
from edge_runtime.models.text.phoneme_ids import PhonemeIdMapper
from edge_runtime.models.text.sentences import split_sentences

__all__ = ["Utterance", "TextFrontend", "normalize_text", "split_sentences", "PhonemeIdMapper"]


@dataclass(frozen=True)
class Utterance:
    """One sentence (or clause group) ready for the acoustic model."""

    text: str
    phonemes: tuple[str, ...]
    ids: tuple[int, ...]


class TextFrontend:
    """espeak-ng based front end for Piper-style voices."""

    def __init__(self, espeak_voice: str, id_map: Mapping[str, Sequence[int]],
                 max_sentence_chars: int = 300) -> None:
        from edge_runtime.models.text.espeak import EspeakPhonemizer

        self.phonemizer = EspeakPhonemizer(espeak_voice)
        self.mapper = PhonemeIdMapper(id_map)
        self.max_sentence_chars = max_sentence_chars

    def sentences(self, text: str) -> list[str]:
        """Normalised sentences, cut where a reader would end one and where espeak-ng does
        (as piper-tts does, which synthesises each espeak sentence on its own)."""
        out: list[str] = []
        for sentence in split_sentences(normalize_text(text), self.max_sentence_chars):
            out.extend(self.phonemizer.split_sentences(sentence))
        return out

    def utterance(self, sentence: str) -> Utterance:
        phonemes = self.phonemizer.phonemize(sentence)
        return Utterance(sentence, tuple(phonemes), tuple(self.mapper.to_ids(phonemes)))

    def utterances(self, text: str) -> Iterator[Utterance]:
        """Lazily, so a stream phonemises only the first sentence before it speaks."""
        for sentence in self.sentences(text):
            utt = self.utterance(sentence)
            if len(utt.phonemes) > 0:
                yield utt
