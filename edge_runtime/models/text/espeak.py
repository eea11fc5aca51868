"""espeak-ng phonemisation through ctypes on the library bundled by `espeakng-loader`.

Why not a system espeak or `phonemizer`: the wheel works on Python 3.10-3.13 with no system
package, and calling `espeak_TextToPhonemes` clause by clause ourselves lets us reproduce the
phoneme stream Piper voices were trained on (IPA, punctuation kept, `,;:` followed by a space).
"""

from __future__ import annotations

import ctypes
import re
import threading
import unicodedata

_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_ESPEAK_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02

# A clause ends at one of these; the punctuation itself is appended to the phonemes,
# as Piper does, because the voice models pauses and intonation from it.
_CLAUSE = re.compile(r"(.*?)([.!?,;:]+|$)(?=\s|$)", re.S)
_LANG_SWITCH = re.compile(r"\([^)]+\)")


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded or refused a voice."""


class EspeakPhonemizer:
    """Text -> IPA phoneme characters, one list per clause group (sentence)."""

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

    def _clause_phonemes(self, clause: str) -> str:
        """All phonemes espeak produces for one clause (it may split it further)."""
        # c_char_p over the bytes (kept alive by `buf`): create_string_buffer would build a new
        # ctypes array type, a reference cycle, for every distinct clause length.
        buf = ctypes.c_char_p(clause.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.cast(buf, ctypes.c_void_p).value)
        parts = []
        while ptr.value:
            out = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _ESPEAK_CHARS_UTF8, _PHONEMES_IPA)
            if out:
                parts.append(out.decode("utf-8"))
        return " ".join(p.strip() for p in parts if p.strip())

    def phonemize(self, text: str) -> list[str]:
        """Phoneme characters (NFD-decomposed codepoints) for `text`, punctuation included."""
        phonemes: list[str] = []
        with self._lock:
            self._set_voice()
            for match in _CLAUSE.finditer(text):
                words, punct = match.group(1).strip(), match.group(2)
                if not words and not punct:
                    continue
                ipa = _LANG_SWITCH.sub("", self._clause_phonemes(words)) if words else ""
                if punct:
                    ipa += punct[0] if punct[0] in ",;:" else punct[-1]
                    if punct[0] in ",;:":
                        ipa += " "
                if phonemes and phonemes[-1] not in (" ",) and ipa and not ipa.startswith(" "):
                    phonemes.append(" ")
                phonemes.extend(unicodedata.normalize("NFD", ipa))
        while phonemes and phonemes[-1] == " ":
            phonemes.pop()
        return phonemes
