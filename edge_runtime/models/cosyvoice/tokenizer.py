"""CosyVoice2's text tokenizer: Qwen2's byte-level BPE from the folder's ``CosyVoice-BlankEN/`` plus the
special tokens CosyVoice2 appends to it.

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
REQUIRED_FILES = ("vocab.json", "merges.txt")


class CosyVoiceTextTokenizer:
    """Text -> CosyVoice2 LM text-token ids. Special-token text in the input (``[laughter]``,
    ``<|endofprompt|>``) becomes its single id, as upstream."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import Qwen2Tokenizer

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
                                "additional_special_tokens": list(ADDED_SPECIAL_TOKENS)})
        self._tok = tok
        self.folder = folder
        self.endofprompt_id: int = tok.convert_tokens_to_ids(ENDOFPROMPT)

    def __len__(self) -> int:
        """Ids in use (base vocabulary + added tokens): every id :meth:`encode` returns is below it."""
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInputError(f"text to tokenize must be a string, got {type(text).__name__}")
        return list(self._tok(text)["input_ids"])
