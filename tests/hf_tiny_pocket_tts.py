"""A tiny random Pocket TTS, built offline from small configs: the model (config.json,
model.safetensors, generation_config.json), its processor (tokenizer, feature extractor, chat
template, processor_config.json) and its audio tokenizer (codec) in audio_tokenizer/, which
processor_config.json names by that relative path. The codec keeps the released frame layout
(24 kHz, 1920 samples = 12.5 latent frames per second) with a few channels only."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = {"audio_prompt_token": "<|audio_prompt|>", "audio_latent_token": "<|audio_latent|>",
                  "audio_prompt_bos_token": "<|audio_prompt_bos|>", "audio_bos_token": "<|audio_bos|>"}
# The released layout: voice BOS + one placeholder per voice latent (an audio item), the text,
# then the first audio position.
CHAT_TEMPLATE = ("{%- for message in messages -%}{%- for content in message['content'] -%}"
                 "{%- if content['type'] == 'audio' -%}{{ audio_prompt_bos_token }}{{ audio_prompt_token }}"
                 "{%- elif content['type'] == 'text' -%}{{ content['text'] }}{%- endif -%}"
                 "{%- endfor -%}{%- endfor -%}{{ audio_bos_token }}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a test!",
          "How are you today? Fine, thanks.", "She sells sea shells by the sea shore."]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import TokenizersBackend

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    return TokenizersBackend(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             pad_token="<pad>", extra_special_tokens=SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE)


def build_tiny_pocket_tts(folder: Path, seed: int = 0) -> Path:
    from transformers import (PocketTTSAudioTokenizerConfig, PocketTTSAudioTokenizerModel, PocketTTSConfig,
                              PocketTTSFeatureExtractor, PocketTTSForConditionalGeneration, PocketTTSProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    codec_config = PocketTTSAudioTokenizerConfig(
        hidden_size=32, num_filters=4, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, latent_dim=8, max_position_embeddings=512,
        sliding_window=64)
    codec = PocketTTSAudioTokenizerModel(codec_config).eval()
    codec.save_pretrained(folder / "audio_tokenizer")
    codec.name_or_path = "audio_tokenizer"  # what processor_config.json records: relative to the folder
    frame = codec_config.frame_size
    features = PocketTTSFeatureExtractor(sampling_rate=codec_config.sampling_rate, frame_size=frame,
                                         pad_to_multiple_of=frame)
    PocketTTSProcessor(features, tokenizer, audio_tokenizer=codec, chat_template=CHAT_TEMPLATE).save_pretrained(folder)

    ids = tokenizer.convert_tokens_to_ids
    config = PocketTTSConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, latent_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        frame_rate=codec_config.frame_rate,
        **{f"{name}_id": ids(token) for name, token in SPECIAL_TOKENS.items()},
        flow_head_config={"hidden_size": 32, "num_hidden_layers": 2, "latent_dim": 8, "condition_dim": 32,
                          "frequency_embedding_size": 16})
    config.architectures = ["PocketTTSForConditionalGeneration"]
    model = PocketTTSForConditionalGeneration(config).eval()
    with torch.no_grad():  # random latent statistics, so denormalising is not the identity
        model.latent_mean.normal_(0, 0.1)
        model.latent_std.uniform_(0.5, 1.5)
        model.model.bos_latent.normal_()
    # sampling as the released generation config does (temperature 0.7)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_pocket_tts(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-pocket-tts")))
