"""A folder holding only the config files of bosonai/higgs-audio-v2-generation-3B-base and its audio
tokenizer (bosonai/higgs-audio-v2-tokenizer), no weights: what `edge-runtime plan` needs to size the
published model before a download, written offline.

    python scripts/higgs_configs.py OUT_DIR [--check]     # OUT_DIR/config.json, OUT_DIR/audio_tokenizer/...
    edge-runtime plan OUT_DIR --profile 8gb

The LM is transformers' default HiggsAudioV2Config (the 3B-base shape: 28 Llama-3.2-3B layers with a
second "audio" FFN each, 128256 text ids, 8 codebooks) with its codebook ids made coherent: the default
`codebook_size=1024` leaves no room for the stream bos/eos ids 1024/1025 it also defaults to (an
IndexError at the first step), so the LM's codebook size is the codec's 1024 + 2. The tokenizer's
config is the published one: DAC strides 8*5*4*2*3 = 960 samples at 24 kHz (25 frames/s), HuBERT-base,
target bandwidths up to 2 kbps, i.e. 8 quantizers of 1024 codes. --check prints the parameter counts
(shared/LARGE_MODELS.md: 5.38B LM, 0.20B tokenizer) and fails when they drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CODEC_CODES = 1024  # bosonai/higgs-audio-v2-tokenizer's codebook size
EXPECTED_PARAMS = {"lm": 5.38e9, "tokenizer": 0.20e9}  # shared/LARGE_MODELS.md, measured on meta
TOLERANCE = 0.02
# bosonai/higgs-audio-v2-tokenizer's config.json (the fields that differ from transformers' defaults)
TOKENIZER = dict(
    sample_rate=24000, semantic_sample_rate=16000, downsample_factor=320, target_bandwidths=[0.5, 1, 1.5, 2],
    codebook_size=CODEC_CODES, codebook_dim=64, kernel_size=3, unit_kernel_size=3, channel_ratios=[1, 1],
    strides=[1, 1], block_dilations=[1, 1],
    acoustic_model_config=dict(model_type="dac", encoder_hidden_size=64, downsampling_ratios=[8, 5, 4, 2, 3],
                               decoder_hidden_size=1024, upsampling_ratios=[8, 5, 4, 2, 3], hidden_size=256,
                               hop_length=960, n_codebooks=9, codebook_size=1024, codebook_dim=8,
                               sampling_rate=16000),
    semantic_model_config=dict(model_type="hubert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
                               conv_stride=[5, 2, 2, 2, 2, 2, 2], num_conv_pos_embeddings=128,
                               num_conv_pos_embedding_groups=16, mask_time_prob=0.0))


def write(folder: Path) -> Path:
    from transformers import HiggsAudioV2Config, HiggsAudioV2TokenizerConfig

    folder = Path(folder)
    config = HiggsAudioV2Config(codebook_size=CODEC_CODES + 2, audio_stream_bos_id=CODEC_CODES,
                                audio_stream_eos_id=CODEC_CODES + 1)
    config.architectures = ["HiggsAudioV2ForConditionalGeneration"]
    config.save_pretrained(folder)
    tokenizer = HiggsAudioV2TokenizerConfig(**TOKENIZER)
    tokenizer.architectures = ["HiggsAudioV2TokenizerModel"]
    tokenizer.save_pretrained(folder / "audio_tokenizer")
    (folder / "processor_config.json").write_text(json.dumps({
        "audio_tokenizer": {"audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
                            "audio_tokenizer_name_or_path": "audio_tokenizer"},
        "audio_stream_bos_id": CODEC_CODES, "audio_stream_eos_id": CODEC_CODES + 1,
        "processor_class": "HiggsAudioV2Processor"}, indent=2))
    return folder


def param_counts(folder: Path) -> dict[str, int]:
    """Parameters of the LM and of the tokenizer, built on the meta device from the written configs."""
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from edge_runtime.models.higgs_audio_v2 import codec
    from edge_runtime.policy.planner import build_on_meta

    lm = build_on_meta(HiggsAudioV2Config.from_pretrained(folder), HiggsAudioV2ForConditionalGeneration)
    tok = build_on_meta(codec.read_config(Path(folder) / "audio_tokenizer"), codec.tokenizer_class())
    return {"lm": sum(p.numel() for p in lm.parameters()), "tokenizer": sum(p.numel() for p in tok.parameters())}


def check(folder: Path) -> list[str]:
    counts = param_counts(folder)
    problems = []
    for name, expected in EXPECTED_PARAMS.items():
        print(f"{name}: {counts[name] / 1e9:.3f}B params (expected {expected / 1e9:.2f}B)")
        if abs(counts[name] - expected) > TOLERANCE * expected:
            problems.append(f"{name} has {counts[name]} params, expected about {expected:.3g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--check", action="store_true", help="print the parameter counts and check them")
    args = parser.parse_args(argv)
    print(write(args.folder))
    problems = check(args.folder) if args.check else []
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
