"""Word timestamps from the Piper voice's duration predictor, mapped to the ORIGINAL text, and the
SRT / WebVTT captions `say --captions` writes from them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_runtime
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.text import normalize_text
from edge_runtime.models.text.alignment import TextAlignment, label_phonemes, words_of
from edge_runtime.runtime import captions
from edge_runtime.serving.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))

TEXT = ("It costs $5 today, and it is 5°C outside. Dr. Smith went to the bakery on Main St. in the 1990s! "
        "In the house of the king, there were 123 cats.")


@pytest.fixture(scope="module")
def rt():
    runtime = edge_runtime.load(profile="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def timed(rt):
    audio, rate, words = rt.synthesize_with_timings(TEXT, seed=7)
    return audio, rate, words


def test_timings_are_monotonic_and_inside_the_audio(timed):
    audio, rate, words = timed
    duration = len(audio) / rate
    assert len(words) >= 30
    previous_end = 0.0
    for w in words:
        assert 0.0 <= w.start_s < w.end_s <= duration + 1e-9, w
        assert w.start_s >= previous_end - 1e-9, w  # no overlaps, in order
        previous_end = w.end_s
    # Times are whole frames of the decoder: multiples of hop / rate (256 / 22050 s).
    frame = 256 / rate
    for w in words[:5]:  # first sentence: no sentence offset to add
        assert abs(w.start_s / frame - round(w.start_s / frame)) < 1e-6


def test_audio_is_what_synthesize_gives(rt, timed):
    audio, _, _ = timed
    reference, _ = rt.synthesize(TEXT, seed=7)
    assert audio.shape == reference.shape
    assert np.array_equal(audio, reference)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0


def test_each_word_span_has_speech_energy(timed):
    """Between words inside a phrase espeak's word boundary (a space phoneme) carries the sound
    gliding from one word to the next, so the reference silence is the pauses: the untimed gaps of
    at least 100 ms (at commas and sentence ends), their middle halves (away from onsets/decays)."""
    audio, rate, words = timed
    spoken = np.zeros(len(audio), dtype=bool)
    for w in words:
        spoken[int(w.start_s * rate):int(w.end_s * rate)] = True
    pauses, k = [], 0
    while k < len(audio):
        if spoken[k]:
            k += 1
            continue
        j = k
        while j < len(audio) and not spoken[j]:
            j += 1
        if j - k >= int(0.1 * rate):
            n = j - k
            pauses.append(audio[k + n // 4:j - n // 4])
        k = j
    assert len(pauses) >= 3  # "today," / "king," / between the sentences / the end
    silence = _rms(np.concatenate(pauses))
    assert silence < 0.005, silence
    word_rms = [_rms(audio[int(w.start_s * rate):int(w.end_s * rate)]) for w in words]
    for w, level in zip(words, word_rms):
        assert level > 10 * silence, (w, level, silence)
    assert np.median(word_rms) > 50 * silence
    # The timed words hold the sound: most of the audio's energy falls inside them.
    assert np.sum(audio[spoken].astype(np.float64) ** 2) > 0.85 * np.sum(audio.astype(np.float64) ** 2)


def test_offsets_point_into_the_original_text(timed):
    _, _, words = timed
    spans = {}
    for w in words:
        assert 0 <= w.start_char < w.end_char <= len(TEXT), w
        spans.setdefault(TEXT[w.start_char:w.end_char], []).append(w.word)
        if w.word.lower() in {"it", "costs", "today", "outside", "smith", "bakery", "house", "king", "cats"}:
            assert TEXT[w.start_char:w.end_char] == w.word
    assert spans["$5"] == ["5", "dollars"]  # the span of "$5" covers "five dollars"
    assert spans["5°C"] == ["5", "degrees", "Celsius"]
    assert spans["Dr."] == ["doctor"]
    assert spans["St."] == ["Street"]
    assert spans["1990s"] == ["19", "nineties"]
    assert spans["123"] == ["123"]  # three espeak words, one text word
    # Every original word is spoken by some timed word, in order.
    starts = [w.start_char for w in words]
    assert starts == sorted(starts)
    covered = {(w.start_char, w.end_char) for w in words}
    assert {(w.start, w.end) for w in words_of(TEXT)} - covered <= {(p.start, p.start + 2) for p in words_of(TEXT)
                                                                    if p.text in ("Dr", "St")}


def test_alignment_without_a_model():
    original = "Call Dr. Smith at 555-1234 & pay $5.50 for \u201cthe\u201d 2 kg bag, e.g. now."
    normalised = normalize_text(original)
    align = TextAlignment(original, normalised)
    got = {w.text: original[slice(*span)] for w, span in zip(align.target, align.spans)}
    assert got["doctor"] == "Dr."
    assert got["Smith"] == "Smith"
    assert got["dollars"] == "$5.50" and got["cents"] == "$5.50"
    assert got["kilograms"] == "kg"  # "2" is unchanged; only the unit was rewritten
    pairs = [(w.text, original[slice(*span)]) for w, span in zip(align.target, align.spans)]
    # Two original words rewritten into eight: each normalised alone tells its share.
    assert pairs[4:12] == [(d, "555-1234") for d in "5551234"] + [("and", "&")]
    assert got["the"] == "the"  # quotes are not part of the word
    assert got["example"] == "e.g."
    assert align.original_span(0, len(normalised)) == (0, len(original) - 1)  # up to "now", not its period


def test_phoneme_labels_follow_espeaks_joined_and_split_words(rt):
    phonemizer = rt.model.frontend.phonemizer
    sentence = "in the house 123"
    phonemes = phonemizer.phonemize(sentence)
    assert "ɪnðə" in "".join(phonemes)  # espeak joins "in the" into one word
    labels = label_phonemes(phonemes, [phonemizer.phonemize(w) for w in sentence.split()])
    text = "".join(phonemes)
    by_word = {i: "".join(ch for ch, lab in zip(phonemes, labels) if lab == i) for i in range(4)}
    assert by_word[0].startswith("ɪn") and "ð" in by_word[1] and by_word[2].startswith("h")
    assert "θɹˈiː" in by_word[3] and "hˈʌndɹɪd" in by_word[3]  # "one hundred twenty three": one word
    assert by_word[2] == "hˈaʊs"  # its stress mark included
    positive = [lab for lab in labels if lab >= 0]
    assert positive == sorted(positive) and text.count(" ") >= 4


# -- captions ------------------------------------------------------------------------------------
_SRT_TIME = r"(\d{2}):(\d{2}):(\d{2}),(\d{3})"
_VTT_TIME = r"(\d{2}):(\d{2}):(\d{2})\.(\d{3})"


def _seconds(groups: tuple[str, ...]) -> float:
    h, m, s, ms = map(int, groups)
    assert m < 60 and s < 60
    return h * 3600 + m * 60 + s + ms / 1000


def _parse_cues(body: str, stamp: str) -> list[tuple[float, float, str]]:
    """Strict: blocks separated by one blank line; a number counting from 1, a timing line, text."""
    assert body.endswith("\n") and not body.endswith("\n\n\n")
    blocks = body.rstrip("\n").split("\n\n")
    out, previous_start = [], -1.0
    for n, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert len(lines) >= 3, block
        assert lines[0] == str(n), block
        m = re.fullmatch(stamp + " --> " + stamp, lines[1])
        assert m, lines[1]
        start, end = _seconds(m.groups()[:4]), _seconds(m.groups()[4:])
        assert start < end and start >= previous_start, block
        previous_start = start
        text = "\n".join(lines[2:])
        assert text.strip() and "-->" not in text
        out.append((start, end, text))
    return out


def parse_srt(body: str) -> list[tuple[float, float, str]]:
    assert not body.startswith("WEBVTT")
    return _parse_cues(body, _SRT_TIME)


def parse_vtt(body: str) -> list[tuple[float, float, str]]:
    assert body.startswith("WEBVTT\n\n")
    return _parse_cues(body[len("WEBVTT\n\n"):], _VTT_TIME)


def test_srt_and_vtt_validate(timed):
    audio, rate, words = timed
    items = captions.cues(TEXT, words)
    srt, vtt = parse_srt(captions.to_srt(items)), parse_vtt(captions.to_vtt(items))
    assert [c[2] for c in srt] == [c[2] for c in vtt]
    assert len(srt) >= 4  # one sentence per cue at least: three sentences, some split at a pause
    joined = " ".join(c[2] for c in srt)
    assert "$5" in joined and "5°C" in joined and "Dr. Smith" in joined and "dollars" not in joined
    assert all(len(c[2]) <= captions.MAX_CUE_CHARS for c in srt)
    assert srt[0][0] == pytest.approx(words[0].start_s, abs=1e-3)
    assert srt[-1][1] == pytest.approx(words[-1].end_s, abs=1e-3) and srt[-1][1] <= len(audio) / rate + 1e-3
    assert captions._stamp(3723.4567, ",") == "01:02:03,457"


def test_say_writes_captions(rt, tmp_path, capsys, monkeypatch):
    from edge_runtime.runtime import loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: rt)
    monkeypatch.setattr(rt, "close", lambda: None)
    text = "Dr. Smith paid $5. Then he left, smiling."
    for suffix, parse in (("srt", parse_srt), ("vtt", parse_vtt)):
        out = tmp_path / f"out.{suffix}"
        assert main(["say", text, "-o", str(tmp_path / "out.wav"), "--seed", "1", "--captions", str(out)]) == 0
        cues = parse(out.read_text(encoding="utf-8"))
        assert cues[0][2].startswith("Dr. Smith paid $5.")
        assert cues[-1][2].endswith("smiling.")
        assert f"wrote {out}" in capsys.readouterr().out


def test_say_rejects_an_unknown_caption_suffix(tmp_path, capsys):
    code = main(["say", "hello", "-o", str(tmp_path / "a.wav"), "--captions", str(tmp_path / "a.txt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--captions" in err and "'txt'" in err and ".srt or .vtt" in err


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from family_toy import build_toy  # registers the family in this process

    return build_toy(tmp_path_factory.mktemp("toy") / "toy")


def test_a_model_without_alignment_says_so(toy, tmp_path, capsys):
    rt = edge_runtime.load(str(toy), profile="cpu", overrides=("runtime.threads=1",))
    try:
        with pytest.raises(InvalidInputError, match="does not report word timings"):
            rt.synthesize_with_timings("Hello there.")
    finally:
        rt.close()
    out = tmp_path / "toy.srt"
    code = main(["say", "--model", str(toy), "--set", "runtime.threads=1", "Hello there.",
                 "-o", str(tmp_path / "toy.wav"), "--captions", str(out)])
    assert code == 2 and not out.exists()
    assert "does not report word timings" in capsys.readouterr().err
