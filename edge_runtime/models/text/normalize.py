"""English text normalisation before phonemisation.

espeak-ng already reads plain numbers, decimals, ordinals and percentages well, so this only
fixes what it gets wrong or what would break sentence splitting: currency order ("$5" -> "five
dollars"), abbreviations with a period ("Dr." would end a sentence), decades, units glued to
numbers, digit groups in phone numbers, typographic punctuation, and symbols no voice can speak (the
symbols espeak-ng reads, like the degree sign, are kept: "5°C" -> "5 degrees Celsius", "90°").
"""

from __future__ import annotations

import logging
import re
import unicodedata

log = logging.getLogger(__name__)

_ABBREVIATIONS = {
    "mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor", "prof": "professor",
    "jr": "junior", "sr": "senior", "vs": "versus", "etc": "et cetera", "approx": "approximately",
    "dept": "department", "mt": "mount", "ft": "fort", "gen": "general", "gov": "governor",
    "capt": "captain", "lt": "lieutenant", "col": "colonel", "sgt": "sergeant", "inc": "incorporated",
    "ltd": "limited", "co": "company", "corp": "corporation", "ave": "avenue", "rd": "road",
}
# Not after a number: "20 ms." is milliseconds (the unit rule below), not "miz".
_ABBREV_RE = re.compile(r"(?<!\d)(?<!\d )\b(" + "|".join(_ABBREVIATIONS) + r")\.(?=(\s+(?-i:[A-Z])|\s*$)?)",
                        re.I)
# Titles precede a name ("Dr. Smith"); the others may end a sentence ("... and Co. Then"),
# where the period must survive as the sentence end.
_TITLES = {"mr", "mrs", "ms", "dr", "prof", "mt", "ft", "gen", "gov", "capt", "lt", "col", "sgt"}
_LATIN_RE = [(re.compile(r"\be\.g\.(?=\s|,|$)", re.I), "for example"),
             (re.compile(r"\bi\.e\.(?=\s|,|$)", re.I), "that is")]
# "Main St." is a street (after a capitalised word), "St. Patrick" a saint.
_STREET_RE = re.compile(r"\b([A-Z][a-z]+) St\.(?=(\s+[A-Z]|\s*$)?)")
_SAINT_RE = re.compile(r"\bSt\.(?=\s+[A-Z])")
_NUMBER_SIGN_RE = re.compile(r"(?:\bNo\.|#)\s?(?=\d)")

_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents"), "¥": ("yen", "yen", "", "")}
_CURRENCY_RE = re.compile(r"([$£€¥])\s?(\d[\d,]*)(?:\.(\d{1,2}))?(\s?(?:million|billion|thousand|trillion)\b)?")
_DECADE_RE = re.compile(r"\b(1[0-9]|20)([0-9])0s\b")
_TENS = {"1": "tens", "2": "twenties", "3": "thirties", "4": "forties", "5": "fifties",
         "6": "sixties", "7": "seventies", "8": "eighties", "9": "nineties", "0": "hundreds"}
_UNITS = {"kg": "kilograms", "g": "grams", "mg": "milligrams", "km": "kilometers", "m": "meters",
          "cm": "centimeters", "mm": "millimeters", "mph": "miles per hour", "km/h": "kilometers per hour",
          "kph": "kilometers per hour", "ms": "milliseconds", "kb": "kilobytes", "mb": "megabytes",
          "gb": "gigabytes", "tb": "terabytes", "ghz": "gigahertz", "mhz": "megahertz", "hz": "hertz",
          "°c": "degrees Celsius", "°f": "degrees Fahrenheit", "lb": "pounds", "lbs": "pounds", "oz": "ounces"}
_UNIT_RE = re.compile(r"(\d)\s?(" + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
                      + r")(?![\w/])", re.I)
_PHONE_RE = re.compile(r"\b(\d{3})-(\d{3,4})(?:-(\d{4}))?\b")

_PUNCT_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                            "\u2014": ", ", "\u2026": ", ", "\u00a0": " ", "\t": " ",
                            "\u2103": "\u00b0C", "\u2109": "\u00b0F"})  # ℃ ℉ -> °C °F
# Categories no voice speaks: symbols like emoji, control/format/private-use characters.
_UNSPEAKABLE_CATEGORIES = {"So", "Cc", "Cf", "Co", "Cs", "Cn"}
# ... except the symbols (category So) espeak-ng reads as words: "90°" is "ninety degrees".
_SPEAKABLE_SYMBOLS = frozenset("\u00b0\u00a9\u00ae\u2122")  # ° © ® ™


def _money(match: re.Match) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[match.group(1)]
    whole, cents, scale = match.group(2).replace(",", ""), match.group(3), match.group(4)
    if scale:  # "$5 million" -> "5 million dollars"
        return f"{whole}{'.' + cents if cents else ''}{scale} {many}"
    words = f"{whole} {one if whole == '1' else many}"
    if cents and int(cents) and sub_one:
        cents = cents.ljust(2, "0")
        words += f" {int(cents)} {sub_one if int(cents) == 1 else sub_many}"
    return words


def _abbreviation(match: re.Match) -> str:
    word = match.group(1).lower()
    ends_sentence = match.group(2) is not None and word not in _TITLES
    return _ABBREVIATIONS[word] + ("." if ends_sentence else "")


def _decade(match: re.Match) -> str:
    century, tens = match.group(1), match.group(2)
    if tens == "0":
        return f"{century}00s" if century != "20" else "two thousands"
    return f"{century} {_TENS[tens]}"


def _unit(match: re.Match) -> str:
    return f"{match.group(1)} {_UNITS[match.group(2).lower()]}"


def _phone(match: re.Match) -> str:
    groups = [g for g in match.groups() if g]
    return ", ".join(" ".join(g) for g in groups)


def drop_unspeakable(text: str) -> str:
    """Remove characters no voice can speak, warning once with what was dropped."""
    kept, dropped = [], []
    for ch in text:
        if (unicodedata.category(ch) in _UNSPEAKABLE_CATEGORIES and ch not in "\n"
                and ch not in _SPEAKABLE_SYMBOLS):
            dropped.append(ch)
            kept.append(" ")
        else:
            kept.append(ch)
    if dropped:
        shown = "".join(sorted(set(dropped)))[:20]
        log.warning("dropped %d character(s) the voice cannot speak: %r", len(dropped), shown)
    return "".join(kept)


def normalize_text(text: str) -> str:
    """Normalise English text for espeak-ng; returns a single-spaced string."""
    text = unicodedata.normalize("NFC", text).translate(_PUNCT_MAP)
    text = drop_unspeakable(text)
    text = re.sub(r"\.{3,}", ", ", text)  # an ellipsis is a pause, not three sentence ends
    for pattern, words in _LATIN_RE:
        text = pattern.sub(words, text)
    text = _STREET_RE.sub(lambda m: m.group(1) + " Street" + ("." if m.group(2) is not None else ""), text)
    text = _SAINT_RE.sub("Saint", text)
    text = _NUMBER_SIGN_RE.sub("number ", text)
    text = _ABBREV_RE.sub(_abbreviation, text)
    text = _CURRENCY_RE.sub(_money, text)
    text = _DECADE_RE.sub(_decade, text)
    text = _PHONE_RE.sub(_phone, text)
    text = _UNIT_RE.sub(_unit, text)
    text = text.replace("&", " and ")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return re.sub(r"(?:,\s*){2,}", ", ", text)
