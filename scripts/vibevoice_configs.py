"""Config-only folders of the published VibeVoice models (no weights): what `edge-runtime plan
--allow-download` fetches from the hub, written here offline in transformers' VibeVoice format.

    python scripts/vibevoice_configs.py OUT_DIR      # writes OUT_DIR/vibevoice-1.5b, OUT_DIR/vibevoice-large

transformers' default VibeVoiceConfig() is a 13.6B shape no checkpoint uses (a Qwen2-7B-sized LM
with default Qwen2 widths); the published models are:
* VibeVoice-1.5B (microsoft/VibeVoice-1.5B, vibevoice/VibeVoice-1.5B-hf): a Qwen2.5-1.5B LM (tied
  embeddings, 64K positions), 2.70B parameters in all;
* VibeVoice-Large (aoi-ot/VibeVoice-Large, "VibeVoice-7B"): a Qwen2.5-7B LM (untied lm_head, 32K
  positions), 9.34B parameters.
Both share the acoustic tokenizer (64-dim latents, 32 filters, 3200-sample hop, depths 3-3-3-3-3-3-8:
transformers' defaults, documented as microsoft/VibeVoice-1.5B's), the semantic encoder (the same
stack with 128-dim output) and a 4-layer diffusion head with FFN ratio 3. Generation settings are
what transformers' converter writes: greedy, guidance_scale 1.3, DPM-Solver++ (squaredcos_cap_v2,
v_prediction).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QWEN25_1_5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                   max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   tie_word_embeddings=True)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 tie_word_embeddings=False)
ACOUSTIC = dict(model_type="vibevoice_acoustic_tokenizer", hidden_size=64, num_filters=32,
                downsampling_ratios=[2, 2, 4, 5, 5, 8], depths=[3, 3, 3, 3, 3, 3, 8], vae_std=0.5 / 0.8)
SEMANTIC = dict(model_type="vibevoice_acoustic_tokenizer_encoder", hidden_size=128, num_filters=32,
                downsampling_ratios=[2, 2, 4, 5, 5, 8], depths=[3, 3, 3, 3, 3, 3, 8])
FFN_RATIO = 3  # the diffusion head's intermediate size is 3x the LM's hidden size
EOS, AUDIO_BOS, AUDIO_EOS, AUDIO = 151643, 151652, 151653, 151654  # Qwen2.5's ids of VibeVoice's tokens
MODELS = {
    "vibevoice-1.5b": (QWEN25_1_5B, 40500, "VibeVoice-1.5B (microsoft/VibeVoice-1.5B)"),
    "vibevoice-large": (QWEN25_7B, 20250, "VibeVoice-Large (aoi-ot/VibeVoice-Large, 7B)"),
}
PUBLISHED_PARAMS = {"vibevoice-1.5b": 2.70e9, "vibevoice-large": 9.34e9}  # LARGE_MODELS.md


def published_config(name: str):
    from transformers import VibeVoiceConfig

    text, _, _ = MODELS[name]
    head = dict(num_hidden_layers=4, intermediate_size=FFN_RATIO * text["hidden_size"])
    return VibeVoiceConfig(text_config=dict(text), audio_config=dict(ACOUSTIC), semantic_model_config=dict(SEMANTIC),
                           diffusion_head_config=head, pad_token_id=EOS, eos_token_id=EOS,
                           audio_bos_token_id=AUDIO_BOS, audio_eos_token_id=AUDIO_EOS, audio_token_id=AUDIO,
                           architectures=["VibeVoiceForConditionalGeneration"])


def write(name: str, folder: Path) -> Path:
    folder = Path(folder)
    published_config(name).save_pretrained(folder)
    _, max_new, _ = MODELS[name]
    generation = {"do_sample": False, "guidance_scale": 1.3, "eos_token_id": EOS, "pad_token_id": EOS,
                  "max_new_tokens": max_new, "max_length": max_new,
                  "noise_scheduler_class": "DPMSolverMultistepScheduler",
                  "noise_scheduler_config": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return folder


def write_all(root: Path) -> dict[str, Path]:
    return {name: write(name, Path(root) / name) for name in MODELS}


def param_count(name: str) -> int:
    """Parameters of the published shape, counted on the meta device (tied tensors once)."""
    import torch
    from transformers import VibeVoiceForConditionalGeneration

    with torch.device("meta"):
        model = VibeVoiceForConditionalGeneration(published_config(name))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


if __name__ == "__main__":
    for key, path in write_all(Path(sys.argv[1])).items():
        print(f"{MODELS[key][2]}: {path} ({param_count(key) / 1e9:.2f}B parameters; "
              f"published {PUBLISHED_PARAMS[key] / 1e9:.2f}B)")
