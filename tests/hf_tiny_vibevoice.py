"""A tiny random VibeVoice (Qwen2 LM, diffusion head, acoustic tokenizer, semantic encoder) and its
processor, built offline from small configs and saved the way a hub download looks: config.json,
generation_config.json, a SHARDED checkpoint (model.safetensors.index.json and its shards, as every
published VibeVoice is), tokenizer files, preprocessor_config.json, processor_config.json and the
published chat template (chat_template.jinja).

The acoustic tokenizer and the semantic encoder keep the real strides (2*2*4*5*5*8 = 3200 samples
per latent at 24 kHz: 7.5 frames/s, the processor's placeholder count and the planner's speech
rate); widths, depths and latent sizes shrink, as everywhere else. The generation settings are the
published ones (transformers' converter): greedy, guidance_scale 1.3, DPMSolverMultistepScheduler
with squaredcos_cap_v2 / v_prediction. Qwen2.5-1.5B's embeddings are tied, so are these.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_RATE = 24000
HOP = 3200  # samples per acoustic latent (7.5 frames per second)
EOS = "<|endoftext|>"  # Qwen2.5's eos and pad
AUDIO_BOS, AUDIO_EOS, AUDIO = "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"
# The four tokens VibeVoice's LM may emit, the diffusion token first (the lowest id): see speaking()
CONTROL = [AUDIO, EOS, AUDIO_BOS, AUDIO_EOS]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
          "Speech synthesis on small machines: one sentence at a time!",
          " Transform the text provided by various speakers into speech output, utilizing the distinct "
          "voice of each respective speaker.", " Voice input:", " Text input:", " Speech output:",
          " Speaker 0:"] * 4
# VibeVoiceProcessor's chat template as transformers' converter writes it for the published models
CHAT_TEMPLATE = """{%- set system_prompt = system_prompt | default(" Transform the text provided by various speakers into speech output, utilizing the distinct voice of each respective speaker.\\n") -%}
{{ system_prompt -}}
{%- set audio_bos_token = audio_bos_token | default("<|vision_start|>") %}
{%- set audio_eos_token = audio_eos_token | default("<|vision_end|>") %}
{%- set audio_diffusion_token = audio_diffusion_token | default("<|vision_pad|>") %}
{%- set ns = namespace(speakers_with_audio="") %}
{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set has_audio = content | selectattr('type', 'equalto', 'audio') | list | length > 0 %}
    {%- if has_audio and role not in ns.speakers_with_audio %}
        {%- set ns.speakers_with_audio = ns.speakers_with_audio + role + "," %}
    {%- endif %}
{%- endfor %}

{%- if ns.speakers_with_audio %}
{{ " Voice input:\\n" }}
{%- for speaker in ns.speakers_with_audio.rstrip(',').split(',') %}
{%- if speaker %}
 Speaker {{ speaker }}:{{ audio_bos_token }}{{ audio_diffusion_token }}{{ audio_eos_token }}{{ "\\n" }}
{%- endif %}
{%- endfor %}
{%- endif %}
 Text input:{{ "\\n" }}

{%- for message in messages %}
    {%- set role = message['role'] %}
    {%- set text_items = message['content'] | selectattr('type', 'equalto', 'text') | list %}
    {%- for item in text_items %}
 Speaker {{ role }}: {{ item['text'] }}{{ "\\n" }}
    {%- endfor %}
{%- endfor %}
 Speech output:{{ "\\n" }}{{ audio_bos_token }}"""
# the published generation settings (transformers' converter): greedy, CFG 1.3, DPM-Solver++
NOISE_SCHEDULER_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


def build_tokenizer():
    """A byte-level BPE (every string tokenizes) with Qwen2.5's special tokens VibeVoice uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=CONTROL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.add_special_tokens({"additional_special_tokens": [AUDIO_BOS, AUDIO_EOS, AUDIO]})
    return fast


def tiny_config(tokenizer):
    from transformers import VibeVoiceConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOS, AUDIO_BOS, AUDIO_EOS, AUDIO)}
    vocab = 64 * ((len(tokenizer) + 63) // 64)
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-6,
                rope_theta=1000000.0)  # Qwen2.5-1.5B ties its embeddings, as VibeVoice-1.5B does
    ratios = [2, 2, 4, 5, 5, 8]  # the real strides: 3200 samples per latent
    acoustic = dict(model_type="vibevoice_acoustic_tokenizer", hidden_size=8, num_filters=2,
                    downsampling_ratios=ratios, depths=[1] * 7, ffn_expansion=2, vae_std=0.625)
    semantic = dict(model_type="vibevoice_acoustic_tokenizer_encoder", hidden_size=16, num_filters=2,
                    downsampling_ratios=ratios, depths=[1] * 7, ffn_expansion=2)
    head = dict(num_hidden_layers=2, intermediate_size=96, frequency_embedding_size=32)
    return VibeVoiceConfig(text_config=text, audio_config=acoustic, semantic_model_config=semantic,
                           diffusion_head_config=head, pad_token_id=ids[EOS], eos_token_id=ids[EOS],
                           audio_bos_token_id=ids[AUDIO_BOS], audio_eos_token_id=ids[AUDIO_EOS],
                           audio_token_id=ids[AUDIO], architectures=["VibeVoiceForConditionalGeneration"])


def speaking(model, tokenizer) -> None:
    """A random LM picks among the four control tokens by chance and, measured, keeps emitting audio
    bos: no frame would ever be generated. With their (tied) embedding rows zero, their logits tie
    at 0 and argmax takes the lowest id, the diffusion token: the tiny model speaks until its frame
    cap, like the other tiny models run to theirs (tests give the rows values to study choices)."""
    ids = tokenizer.convert_tokens_to_ids(CONTROL)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = 0.0
        if not model.config.tie_word_embeddings:
            model.lm_head.weight[ids] = 0.0


def build_tiny_vibevoice(folder: Path, max_shard_size: str = "1MB") -> Path:
    from transformers import (VibeVoiceAcousticTokenizerFeatureExtractor, VibeVoiceForConditionalGeneration,
                              VibeVoiceProcessor)

    folder = Path(folder)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = VibeVoiceForConditionalGeneration(config).eval()
    with torch.no_grad():
        # trained-like scales: the ConvNeXt residuals matter (layer scale 1e-6 leaves them inert) and
        # convs keep unit gain (std 0.01 would shrink the waveform to ~1e-7)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):  # (out, in / groups, kernel)
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
            elif isinstance(module, torch.nn.ConvTranspose1d):  # (in, out, kernel)
                module.weight.normal_(0.0, module.weight[:, 0].numel() ** -0.5)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.normal_(0.0, 0.3)
        # the published factors rescale latents to unit variance; any non-trivial pair will do
        model.model.latent_scaling_factor.fill_(1.7)
        model.model.latent_bias_factor.fill_(-0.05)
        speaking(model, tokenizer)
    gen = model.generation_config
    gen.do_sample = False
    gen.guidance_scale = 1.3
    gen.max_new_tokens = 64
    # not GenerationConfig fields: update() would drop them (LARGE_MODELS.md), setattr keeps them
    gen.noise_scheduler_class = "DPMSolverMultistepScheduler"
    gen.noise_scheduler_config = dict(NOISE_SCHEDULER_CONFIG)
    gen.bos_token_id = None
    gen.eos_token_id = config.eos_token_id
    gen.pad_token_id = config.pad_token_id
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    features = VibeVoiceAcousticTokenizerFeatureExtractor(sampling_rate=SAMPLE_RATE, pad_to_multiple_of=HOP)
    VibeVoiceProcessor(feature_extractor=features, tokenizer=tokenizer,
                       chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_vibevoice(Path(sys.argv[1])))
