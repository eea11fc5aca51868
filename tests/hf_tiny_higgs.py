"""A tiny random Higgs Audio V2 (dual-FFN Llama LM, 8 delay-patterned codebooks) with its audio tokenizer
and processor, built offline from small configs and saved the way our folders look: the LM SHARDED
(model.safetensors.index.json + several shards, as every published checkpoint is), config.json,
generation_config.json, the text tokenizer, the DAC feature extractor, processor_config.json with the
chat template, and the audio tokenizer in `audio_tokenizer/` (its own config.json + model.safetensors).

Real rates, small widths: the tokenizer keeps 24 kHz, the DAC strides 8*5*4*2*3 = 960 samples (25
frames/s) and HuBERT's 320-sample hop at 16 kHz (50 Hz, every second feature kept), so frame counts match
the published model. Its codebooks shrink to 16 codes: 8 quantizers need a bandwidth of 8 x 25 x log2(16)
= 800 bit/s, hence target_bandwidths [0.4, 0.8]. The LM's codebook size is the codec's + 2 (stream bos 16,
stream eos 17). Pitfalls (shared/LARGE_MODELS.md): the DAC decoder halves its channels over 5 stages
(decoder_hidden_size >= 32), codebooks initialise to zeros (randomised here), and processor_config.json
stores the audio tokenizer's ABSOLUTE path: the tokenizer is saved and reloaded before the processor is
built, so that path is `audio_tokenizer/` inside this folder (our loader also looks there by name).
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_RATE = 24000
NUM_CODEBOOKS = 8
CODEC_CODEBOOK = 16
CODEC_SUBFOLDER = "audio_tokenizer"
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS = "<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|audio_eos|>"
AUDIO_DELAY = "<|reserved_special_token_6|>"
SCENE_START, SCENE_END = "<|scene_desc_start|>", "<|scene_desc_end|>"
SPECIAL = [BOS, EOS, PAD, HEADER_START, HEADER_END, EOT, AUDIO_OUT, AUDIO_OUT_BOS, AUDIO_EOS, AUDIO_DELAY,
           SCENE_START, SCENE_END]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
          "Generate audio following instruction.", "Audio is recorded from a quiet room.",
          "Speech synthesis on small machines: one sentence at a time!"] * 4

# The published model's chat template, for the conversations we build (system, optional scene, user text,
# assistant audio): Llama 3 headers, the scene inside the system turn, an assistant's audio as
# <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>, and the generation prompt opening an audio stream.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim -}}"
    "{%- if messages and messages[0]['role'] == 'scene' -%}"
    "{{- '\\n\\n<|scene_desc_start|>\\n' + (messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text']) | trim + '\\n<|scene_desc_end|>' -}}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}"
    "{%- elif message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' -}}"
    "{%- endif -%}")


def build_tokenizer():
    """A byte-level BPE (every string tokenizes) with the Llama 3 / Higgs special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    return fast


def tokenizer_config():
    from transformers import DacConfig, HiggsAudioV2TokenizerConfig, HubertConfig

    dac = DacConfig(encoder_hidden_size=4, downsampling_ratios=[8, 5, 4, 2, 3], decoder_hidden_size=32,
                    upsampling_ratios=[8, 5, 4, 2, 3], hidden_size=16, n_codebooks=1, codebook_size=16,
                    codebook_dim=4, hop_length=960, sampling_rate=SAMPLE_RATE)
    hubert = HubertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          conv_dim=[8] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                          mask_time_prob=0.0)
    return HiggsAudioV2TokenizerConfig(acoustic_model_config=dac.to_dict(), semantic_model_config=hubert.to_dict(),
                                       codebook_size=CODEC_CODEBOOK, codebook_dim=4, target_bandwidths=[0.4, 0.8],
                                       sample_rate=SAMPLE_RATE)


def model_config(tokenizer):
    from transformers import HiggsAudioV2Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    return HiggsAudioV2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        num_codebooks=NUM_CODEBOOKS, codebook_size=CODEC_CODEBOOK + 2, audio_stream_bos_id=CODEC_CODEBOOK,
        audio_stream_eos_id=CODEC_CODEBOOK + 1, audio_token_id=ids[AUDIO_OUT], audio_bos_token_id=ids[AUDIO_OUT_BOS],
        audio_delay_token_id=ids[AUDIO_DELAY], pad_token_id=ids[PAD], bos_token_id=ids[BOS],
        eos_token_id=ids[EOT], architectures=["HiggsAudioV2ForConditionalGeneration"])


def build_tiny_higgs(folder: Path, max_shard_size: str = "200KB") -> Path:
    from transformers import DacFeatureExtractor, HiggsAudioV2ForConditionalGeneration

    from edge_runtime.models.higgs_audio_v2.codec import build_processor, tokenizer_class

    folder = Path(folder)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration(model_config(tokenizer)).eval()
    # the published generation_config.json (transformers' conversion script): greedy decoding with
    # repetition-aware sampling (a code repeated twice in the last 7 frames is resampled at random);
    # the custom keys are set as attributes (update() drops keys GenerationConfig does not define)
    gen = model.generation_config
    gen.update(do_sample=False, bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
               pad_token_id=model.config.pad_token_id)
    gen.ras_win_len, gen.ras_win_max_num_repeat = 7, 2
    gen._from_model_config = False  # as published: else generate() rebuilds it from config.json
    # A random head is unsure (logits ~0.16 apart) and emits the stream-eos code early and at random
    # (one codebook's eos ends the sentence a few steps later). Made confident like a trained one (x25:
    # logits a few units apart, sampling still varies with the seed) with its eos rows zeroed (eos
    # scores 0 against the codes' spread), greedy decoding runs to the step cap and sampling nearly
    # always does, as a trained model runs to the end of its sentence.
    with torch.no_grad():
        head = model.audio_lm_head.weight.view(NUM_CODEBOOKS, CODEC_CODEBOOK + 2, -1)
        head.mul_(25.0)
        head[:, CODEC_CODEBOOK + 1] = 0
    model.save_pretrained(folder, max_shard_size=max_shard_size)

    codec_class = tokenizer_class()
    codec = codec_class(tokenizer_config()).eval()
    # the residual quantizer's codebooks initialise to zeros (training fills them): every frame would
    # get code 0; random codebooks make the codes depend on the audio
    with torch.no_grad():
        for name, buf in codec.named_buffers():
            if name.endswith("codebook.embed"):
                buf.normal_()
    codec.save_pretrained(folder / CODEC_SUBFOLDER)
    codec = codec_class.from_pretrained(folder / CODEC_SUBFOLDER)  # name_or_path: that folder
    processor = build_processor(
        DacFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, hop_length=960), tokenizer, codec,
        chat_template=CHAT_TEMPLATE, audio_stream_bos_id=CODEC_CODEBOOK, audio_stream_eos_id=CODEC_CODEBOOK + 1)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_higgs(Path(sys.argv[1])))
