"""Folders holding only the config files of the published transformers speech models (no weights):
what `edge-runtime plan --allow-download` fetches from the hub, written here offline from
transformers' default configs (the published sizes).

    python scripts/published_configs.py OUT_DIR      # writes OUT_DIR/csm, OUT_DIR/dia, OUT_DIR/pocket_tts

The codecs a processor holds are written where our loaders look for them (Dia's DAC in dac/,
Pocket TTS's audio tokenizer in audio_tokenizer/, named by processor_config.json), so their
plans include the codecs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# descript/dac_44khz, the codec nari-labs/Dia-1.6B names: transformers' DacConfig at 44.1 kHz
DAC_44KHZ = dict(encoder_hidden_size=64, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=1536,
                 n_codebooks=9, codebook_size=1024, codebook_dim=8, upsampling_ratios=[8, 8, 4, 2],
                 hop_length=512, sampling_rate=44100)


def _save(config, folder: Path, architecture: str) -> None:
    config.architectures = [architecture]
    config.save_pretrained(folder)


def write_csm(folder: Path) -> Path:
    from transformers import CsmConfig

    _save(CsmConfig(), folder, "CsmForConditionalGeneration")  # Mimi lives inside the model
    return folder


def write_dia(folder: Path) -> Path:
    from transformers import DacConfig, DiaConfig

    _save(DiaConfig(), folder, "DiaForConditionalGeneration")
    _save(DacConfig(**DAC_44KHZ), folder / "dac", "DacModel")
    (folder / "processor_config.json").write_text(json.dumps({
        "audio_tokenizer": {"audio_tokenizer_class": "DacModel", "audio_tokenizer_name_or_path": "dac"},
        "processor_class": "DiaProcessor"}, indent=2))
    return folder


def write_pocket_tts(folder: Path) -> Path:
    from transformers import PocketTTSAudioTokenizerConfig, PocketTTSConfig

    _save(PocketTTSConfig(), folder, "PocketTTSForConditionalGeneration")
    _save(PocketTTSAudioTokenizerConfig(), folder / "audio_tokenizer", "PocketTTSAudioTokenizerModel")
    (folder / "processor_config.json").write_text(json.dumps({
        "audio_tokenizer": {"audio_tokenizer_class": "PocketTTSAudioTokenizerModel",
                            "audio_tokenizer_name_or_path": "audio_tokenizer"},
        "processor_class": "PocketTTSProcessor"}, indent=2))
    return folder


WRITERS = {"csm": write_csm, "dia": write_dia, "pocket_tts": write_pocket_tts}
NAMES = {"csm": "CSM (sesame/csm-1b)", "dia": "Dia (nari-labs/Dia-1.6B)", "pocket_tts": "Pocket TTS"}


def write_all(root: Path) -> dict[str, Path]:
    return {name: write(Path(root) / name) for name, write in WRITERS.items()}


if __name__ == "__main__":
    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
