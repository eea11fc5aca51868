"""CosyVoice2/3's text tokenizer: Qwen2's byte-level BPE from the folder's ``CosyVoice-BlankEN/`` plus the
special tokens CosyVoice2 (or CosyVoice3: the same, then phones and pinyin) appends to it.

Upstream loads the BPE with ``AutoTokenizer`` and then adds its markers with ``add_special_tokens``;
added tokens take the next free ids in the order given, so the list below must keep upstream's order
for the LM's embedding rows to line up (on the published vocab ``<|endofprompt|>`` becomes 151646).
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import InvalidInputError

ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"  # ends an instruction (instruct mode) in the LM's prompt text
# CosyVoice2's additions to Qwen2's vocabulary, in upstream's order (the ids depend on it). They are
# not trained chat markers: paralinguistic tags ([laughter], <strong>...</strong>) and the prompt end.
ADDED_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", ENDOFPROMPT,
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)
ENDOFSYSTEM = "<|endofsystem|>"


def _cosyvoice3_additions() -> tuple[str, ...]:
    """What CosyVoice3 appends after CosyVoice2's list, in upstream's order: ``<|endofsystem|>``, the
    CMU (ARPAbet) phones in alphabetical order, each vowel followed by its stress-marked forms 0-2,
    then pinyin finals/syllables with tone marks (upstream's list, kept verbatim)."""
    vowels = "AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split()
    consonants = "B CH D DH F G HH JH K L M N NG P R S SH T TH V W Y Z ZH".split()
    phones = [p for v in sorted(vowels + consonants) for p in ([v, v + "0", v + "1", v + "2"] if v in vowels else [v])]
    return (ENDOFSYSTEM, *(f"[{p}]" for p in phones), *(f"[{p}]" for p in _PINYIN.split()))


_PINYIN = """
a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng ióng iù iú iā
iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u uang ue un uo uà uài uàn uàng
uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á
ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng
ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ
"""
# CosyVoice3's additions: CosyVoice2's (so <|endofprompt|> keeps its id, 151646 on the published
# vocabulary, which CosyVoice3's LM asserts) followed by the list above.
ADDED_SPECIAL_TOKENS_V3 = ADDED_SPECIAL_TOKENS + _cosyvoice3_additions()
REQUIRED_FILES = ("vocab.json", "merges.txt")


class CosyVoiceTextTokenizer:
    """Text -> CosyVoice2 (``version`` 2) or CosyVoice3 (3) LM text-token ids. Special-token text in
    the input (``[laughter]``, ``<|endofprompt|>``, CosyVoice3's ``[AA1]``) becomes its single id,
    as upstream."""

    def __init__(self, folder: str | Path, version: int = 2) -> None:
        from transformers import Qwen2Tokenizer

        if version not in (2, 3):
            raise InvalidInputError(f"version={version!r}: allowed are 2 (CosyVoice2) and 3 (CosyVoice3)")
        folder = Path(folder)
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise InvalidInputError(f"CosyVoice2 text tokenizer folder {folder} lacks {', '.join(missing)} "
                                    f"(it needs {', '.join(REQUIRED_FILES)}; tokenizer_config.json is optional)")
        try:
            tok = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception on bad files
            raise InvalidInputError(f"cannot read the Qwen2 tokenizer in {folder} "
                                    f"({', '.join(REQUIRED_FILES)}, tokenizer_config.json): "
                                    f"{type(exc).__name__}: {exc}") from None
        tok.add_special_tokens({"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT,
                                "additional_special_tokens": list(ADDED_SPECIAL_TOKENS_V3 if version == 3
                                                                  else ADDED_SPECIAL_TOKENS)})
        self._tok = tok
        self.folder = folder
        self.version = version
        self.endofprompt_id: int = tok.convert_tokens_to_ids(ENDOFPROMPT)

    def __len__(self) -> int:
        """Ids in use (base vocabulary + added tokens): every id :meth:`encode` returns is below it."""
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInputError(f"text to tokenize must be a string, got {type(text).__name__}")
        return list(self._tok(text)["input_ids"])
