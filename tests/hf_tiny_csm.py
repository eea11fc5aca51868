"""A tiny random Sesame CSM (Llama backbone, depth decoder, Mimi codec) and its processor, built
offline from small configs and saved the way a hub download looks: config.json,
generation_config.json, model.safetensors, tokenizer, feature extractor and processor files.

The Mimi codec keeps the real strides (upsampling ratios 8/6/5/4, same kernels), so frame counts
(12.5 Hz at 24 kHz) and CsmProcessor's hard-coded encoded-length formula match the real model;
only widths, depths and codebook sizes shrink.
"""

from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"  # Llama 3's, as in sesame/csm-1b
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"
NUM_CODEBOOKS = 4
CODEBOOK_SIZE = 64
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
          "Speech synthesis on small machines: one sentence at a time!"] * 4

# CSM's chat template (speaker turns: bos [speaker]text eos, then the turn's audio frames)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- bos_token -}}{{- '[' + message['role'] + ']' -}}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{{- eos_token -}}"
    "{%- for item in message['content'] if item['type'] == 'audio' -%}{{- '<|AUDIO|><|audio_eos|>' -}}"
    "{%- endfor -%}"
    "{%- endfor -%}")


def build_tokenizer():
    """A byte-level BPE (every string tokenizes) with CSM's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, AUDIO, AUDIO_EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": [AUDIO, AUDIO_EOS]})
    return fast


def build_tiny_csm(folder: Path) -> Path:
    from transformers import (CsmConfig, CsmForConditionalGeneration, CsmProcessor,
                              EncodecFeatureExtractor, MimiConfig)

    folder = Path(folder)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, AUDIO, AUDIO_EOS, PAD)}
    codec = MimiConfig(hidden_size=32, num_filters=4, num_hidden_layers=2, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=4, codebook_size=CODEBOOK_SIZE,
                       codebook_dim=16, vector_quantization_hidden_dimension=16,
                       num_quantizers=NUM_CODEBOOKS, upsample_groups=32, sliding_window=64,
                       max_position_embeddings=512)
    depth = dict(num_codebooks=NUM_CODEBOOKS, backbone_hidden_size=64, vocab_size=CODEBOOK_SIZE,
                 hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=NUM_CODEBOOKS + 1)
    config = CsmConfig(
        num_codebooks=NUM_CODEBOOKS, vocab_size=CODEBOOK_SIZE, text_vocab_size=len(tokenizer),
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
        # codes beyond the codebook would index past Mimi's embeddings: keep the vocab = codebook,
        # eos is code 0 (as in the real model), pad the last code
        codebook_pad_token_id=CODEBOOK_SIZE - 1, codebook_eos_token_id=0,
        bos_token_id=ids[BOS], pad_token_id=ids[PAD], audio_token_id=ids[AUDIO],
        audio_eos_token_id=ids[AUDIO_EOS], depth_decoder_config=depth, codec_config=codec.to_dict(),
        architectures=["CsmForConditionalGeneration"])
    torch.manual_seed(0)
    model = CsmForConditionalGeneration(config).eval()
    # Mimi initialises its codebooks to zeros (training fills them): every code would decode to
    # the same audio and encoding would be degenerate; random codebooks make codes matter
    with torch.no_grad():
        for name, buf in model.codec_model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buf.normal_()
    # the published generation defaults: sampling with temperature 0.9 / top-k 50 in both stages
    model.generation_config.update(do_sample=True, temperature=0.9, top_k=50)
    model.depth_decoder.generation_config.update(do_sample=True, temperature=0.9, top_k=50)
    model.save_pretrained(folder)
    processor = CsmProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), tokenizer,
                             chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_csm(Path(sys.argv[1])))
