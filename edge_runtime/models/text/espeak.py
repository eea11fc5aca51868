"""espeak-ng phonemisation through ctypes on the library bundled by `espeakng-loader`.

Why not a system espeak or `phonemizer`: the wheel works on Python 3.10-3.13 with no system
package. We reproduce the phoneme stream of piper-tts 1.8.0, which the Piper voices are driven
with, from that library:

- espeak-ng itself splits the text into clauses (one `espeak_TextToPhonemes` call each), as
  piper does; the clause's terminator (`.?!,:;` or none) is read from the text espeak consumed,
  since the 1.52.0 library lacks `espeak_TextToPhonemesWithTerminator`. Punctuation is kept,
  `,;:` are followed by a space, a clause without a terminator (an ellipsis, a dash) is joined
  to the next one with nothing between, and `.?!` end a sentence.
- The linking glide: piper-tts 1.8.0 statically links espeak-ng at commit 212928b (March 2025).
  Since espeak-ng commit 8afe77b (Dec 2024, "Avoid underflowing ph_list3") `WritePhMnemonic`
  evaluates phoneme programs with `plist_start == plist`, so every `prevPh(...)` condition is
  false while writing IPA (espeak-ng issue #2367). The linking-j phoneme `;`, which espeak
  inserts after an i-type vowel before a vowel ("bakery on", "the end", "being"), has
  `IF prevPh(#i) THEN ipa NULL` and is therefore written as `ʲ` there, where 1.52.0 writes
  nothing. We ask espeak for the same clause in IPA and in phoneme mnemonics, both with a
  phoneme separator, and write `ʲ` for every `;` mnemonic whose IPA came out empty.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import unicodedata

log = logging.getLogger(__name__)

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_ESPEAK_CHARS_UTF8 = 1
_PHONEMES_MNEMONIC = 0x00
_PHONEMES_IPA = 0x02
# Phoneme separator (bits 8-23 of the phoneme mode): a private-use character no voice emits.
_SEP = "\ue000"
_SEP_BITS = ord(_SEP) << 8

_LANG_SWITCH = re.compile(r"\([^)]+\)")
_CLAUSE_TERMINATORS = ".?!,:;"
# What may trail a clause's terminator in the text espeak consumed: spaces, quotes, brackets.
_TRAILING = " \t\r\n\"'`()[]{}\u2018\u2019\u201c\u201d\u00ab\u00bb"
_LINKING_J = ";"   # espeak's mnemonic for the linking/palatal glide
_GLIDE_IPA = "\u02b2"  # ʲ, its IPA name


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded or refused a voice."""


def _terminator(consumed: str, last: bool) -> str:
    """The punctuation that ended a clause, from the text espeak consumed for it.

    espeak reads one character past a clause boundary before returning, so unless this is the
    last clause the consumed text may end with the first letter or digit of the next one.
    """
    text = consumed
    if not last and text and text[-1].isalnum():
        text = text[:-1]
    text = text.rstrip(_TRAILING)
    if text.endswith(("...", "\u2026")):
        return ""  # an ellipsis ends a clause without a terminator
    return text[-1] if text and text[-1] in _CLAUSE_TERMINATORS else ""


def _with_glides(ipa: str, mnemonics: str) -> str:
    """`ipa` (phoneme-separated) with `ʲ` for each linking `;` espeak 1.52.0 left unwritten."""
    ipa_words, mn_words = ipa.split(" "), mnemonics.split(" ")
    if len(ipa_words) != len(mn_words):
        log.debug("espeak IPA and mnemonic outputs differ in words: %r / %r", ipa, mnemonics)
        return ipa.replace(_SEP, "")
    out = []
    for ipa_word, mn_word in zip(ipa_words, mn_words):
        ipa_ph, mn_ph = ipa_word.split(_SEP), mn_word.split(_SEP)
        if _LINKING_J in mn_ph and len(ipa_ph) == len(mn_ph):
            ipa_ph = [_GLIDE_IPA if m == _LINKING_J and not i else i for i, m in zip(ipa_ph, mn_ph)]
        out.append("".join(ipa_ph))
    return " ".join(out)


class EspeakPhonemizer:
    """Text -> IPA phoneme characters, grouped by sentence the way piper-tts groups them."""

    _lock = threading.Lock()  # libespeak-ng keeps global state: one caller at a time
    _lib = None
    _voice: str | None = None

    def __init__(self, voice: str = "en-us") -> None:
        self.voice = voice
        self._ensure_library()

    @classmethod
    def _ensure_library(cls) -> None:
        if cls._lib is not None:
            return
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise EspeakError("espeakng-loader is not installed: pip install espeakng-loader") from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        data = espeakng_loader.get_data_path().encode()
        if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0) < 0:
            raise EspeakError(f"espeak-ng failed to initialise with data at {data.decode()}")
        cls._lib = lib

    def _set_voice(self) -> None:
        if EspeakPhonemizer._voice != self.voice:
            if self._lib.espeak_SetVoiceByName(self.voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice {self.voice!r}")
            EspeakPhonemizer._voice = self.voice

    def _clauses(self, text: str, mode: int) -> list[tuple[str, str]]:
        """(phonemes, consumed text) for each clause espeak splits `text` into."""
        raw = text.encode("utf-8")
        # c_char_p over the bytes (kept alive by `buf`): create_string_buffer would build a new
        # ctypes array type, a reference cycle, for every distinct text length.
        buf = ctypes.c_char_p(raw)
        base = ctypes.cast(buf, ctypes.c_void_p).value
        ptr = ctypes.c_void_p(base)
        clauses = []
        while ptr.value:
            start = ptr.value - base
            out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _ESPEAK_CHARS_UTF8, mode)
            end = ptr.value - base if ptr.value else len(raw)
            clauses.append((out.decode("utf-8") if out else "",
                            raw[start:end].decode("utf-8", errors="replace")))
        return clauses

    def split_sentences(self, text: str) -> list[str]:
        """`text` cut where espeak-ng ends a sentence (`.?!` clause terminators), so that each
        piece phonemises to one of piper's sentences; a question inside quotes followed by
        lower-case text ('"Why?" he asked.') ends one for espeak though not for a reader."""
        if not text.strip():
            return []
        with self._lock:
            self._set_voice()
            clauses = self._clauses(text, _PHONEMES_MNEMONIC)
        pieces, begin, offset = [], 0, 0
        for k, (_, consumed) in enumerate(clauses):
            offset += len(consumed)
            last = k == len(clauses) - 1
            if last or _terminator(consumed, last) not in (".", "?", "!"):
                continue
            lookahead = 1 if consumed and consumed[-1].isalnum() else 0
            cut = offset - lookahead
            piece = text[begin:cut].strip()
            if piece:
                pieces.append(piece)
                begin = cut
        rest = text[begin:].strip()
        if rest:
            pieces.append(rest)
        return pieces

    def phonemize_sentences(self, text: str) -> list[list[str]]:
        """Phoneme characters (NFD codepoints) per sentence, punctuation included; what
        piper-tts 1.8.0's `EspeakPhonemizer.phonemize` returns, empty sentences left out."""
        if not text.strip():
            return []
        with self._lock:
            self._set_voice()
            ipa = self._clauses(text, _PHONEMES_IPA | _SEP_BITS)
            mnemonics = self._clauses(text, _PHONEMES_MNEMONIC | _SEP_BITS)
        if len(ipa) != len(mnemonics):  # pragma: no cover - same text, same clauses
            log.debug("espeak split %r differently in IPA and mnemonic modes", text)
            mnemonics = [("", "")] * len(ipa)
        sentences: list[list[str]] = []
        current: list[str] = []
        for k, ((phonemes, consumed), (mnemonic, _)) in enumerate(zip(ipa, mnemonics)):
            terminator = _terminator(consumed, last=k == len(ipa) - 1)
            phonemes = _LANG_SWITCH.sub("", _with_glides(phonemes.strip(), mnemonic.strip()))
            phonemes += terminator
            if terminator in (",", ":", ";"):
                phonemes += " "
            current.extend(unicodedata.normalize("NFD", phonemes))
            if terminator in (".", "?", "!"):
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
        return [s for s in sentences if s]

    def phonemize(self, text: str) -> list[str]:
        """Phoneme characters for `text`, its sentences joined by a space."""
        phonemes: list[str] = []
        for sentence in self.phonemize_sentences(text):
            if phonemes:
                phonemes.append(" ")
            phonemes.extend(sentence)
        return phonemes
