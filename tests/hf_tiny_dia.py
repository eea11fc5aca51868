"""A tiny random Dia (byte-level text encoder, DAC-code decoder) and its processor, built offline from
small configs and saved the way a hub download looks: config.json, generation_config.json,
model.safetensors, tokenizer_config.json and processor_config.json.

One difference from the hub: there DiaProcessor's processor_config.json names its DAC codec by hub
id (descript/dac_44khz, a separate repository). Here the codec is saved in a `dac/` subfolder
(DacModel.save_pretrained: config.json + model.safetensors), which DiaSpeechModel.load_processor
looks for first, so the folder is self-contained and needs no other download.

The DAC keeps the real hop (2*4*8*8 = 512 samples at 44.1 kHz, ~86 frames/s, what the planner
assumes) and the real 9 codebooks of 1024 codes: DiaProcessor hard-codes the delay pattern
[0, 8, ..., 15] and the audio eos/pad/bos ids 1024/1025/1026. Only widths and depths shrink.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_RATE = 44100


def build_tiny_dia(folder: Path) -> Path:
    from transformers import (DacConfig, DacModel, DiaConfig, DiaDecoderConfig, DiaEncoderConfig,
                              DiaFeatureExtractor, DiaForConditionalGeneration, DiaProcessor, DiaTokenizer)

    folder = Path(folder)
    encoder = DiaEncoderConfig(max_position_embeddings=512, num_hidden_layers=4, hidden_size=64,
                               num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                               intermediate_size=256)
    decoder = DiaDecoderConfig(max_position_embeddings=1024, num_hidden_layers=4, hidden_size=64,
                               intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, cross_num_attention_heads=2, cross_head_dim=16,
                               cross_num_key_value_heads=2, cross_hidden_size=64)
    config = DiaConfig(encoder_config=encoder, decoder_config=decoder)
    torch.manual_seed(0)
    model = DiaForConditionalGeneration(config).eval()
    # the published generation defaults (nari-labs/Dia-1.6B-0626): CFG 3, temperature 1.8, top-k 45
    model.generation_config.update(do_sample=True, guidance_scale=3.0, temperature=1.8, top_p=0.95,
                                   top_k=45)
    model.save_pretrained(folder)

    codec = DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=32,
                      n_codebooks=9, codebook_size=1024, codebook_dim=4, sampling_rate=SAMPLE_RATE)
    dac = DacModel(codec).eval()
    dac.save_pretrained(folder / "dac")
    # FACTS: the feature extractor defaults to 16 kHz, but Dia's processor feeds it 44.1 kHz audio
    processor = DiaProcessor(feature_extractor=DiaFeatureExtractor(sampling_rate=SAMPLE_RATE),
                             tokenizer=DiaTokenizer(), audio_tokenizer=dac)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_dia(Path(sys.argv[1])))
