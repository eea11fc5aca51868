"""Write a random-weight CosyVoice2 model folder in the official layout.

Run with the reference venv's python (scripts/cosyvoice_reference.sh builds it):

    .cosyvoice_ref/bin/python scripts/cosyvoice_testmodel.py OUT_DIR [--size tiny|published] [--seed N]
    .cosyvoice_ref/bin/python scripts/cosyvoice_testmodel.py --smoke

Layout (as CosyVoice2-0.5B ships it):
    cosyvoice2.yaml            upstream's hyperpyyaml (tiny numbers substituted for --size tiny)
    llm.pt flow.pt hift.pt     plain fp32 state dicts of the reference's Qwen2LM /
                               CausalMaskedDiffWithXvec / HiFTGenerator (random init)
    CosyVoice-BlankEN/         Qwen2 config.json + a small byte-level BPE tokenizer (vocab.json,
                               merges.txt) + random model.safetensors (upstream's Qwen2Encoder
                               calls from_pretrained on it before llm.pt overwrites it)
    campplus.onnx              stand-in: input "input" [B,T,80] fbank -> output "output" [B,192]
    speech_tokenizer_v2.onnx   stand-in: "feats" [1,128,T] whisper log-mel + "feats_length" [1]
                               int32 -> "indices" [1,T'] int32 in 0..6560, T' = 25 Hz (T/4 rounded up)
    spk2info.pt                empty dict (upstream loads it when present)

Weights come from the reference package's own modules, built from the yaml with hyperpyyaml,
so the key names and shapes are exactly what upstream saves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cosyvoice_reference_run as ref  # noqa: E402  (same folder)

SIZES = {
    # Published numbers: CosyVoice2-0.5B's cosyvoice2.yaml and Qwen2.5-0.5B's config.
    "published": dict(
        llm_size=896, qwen_layers=24, qwen_heads=14, qwen_kv_heads=2, qwen_ffn=4864, qwen_vocab=151936,
        flow_size=512, enc_heads=8, enc_ffn=2048, enc_blocks=6,
        est_channels=256, est_head_dim=64, est_blocks=4, est_mid_blocks=12, est_heads=8,
        hift_channels=512, f0_cond_channels=512,
    ),
    # Tiny: same structure and the same fixed sizes (80 mels, 192-d speaker, 6561 speech tokens,
    # upsample 8x5x3 with iSTFT hop 4 = 480 samples per frame at 24 kHz), few and narrow layers.
    "tiny": dict(
        llm_size=64, qwen_layers=2, qwen_heads=4, qwen_kv_heads=2, qwen_ffn=128, qwen_vocab=512,
        flow_size=64, enc_heads=2, enc_ffn=128, enc_blocks=1,
        est_channels=32, est_head_dim=16, est_blocks=1, est_mid_blocks=2, est_heads=2,
        hift_channels=32, f0_cond_channels=32,
    ),
}

# Upstream's cosyvoice2.yaml (inference part), dims as {placeholders}; everything else verbatim in
# form: the family reads numbers from it without executing tags.
YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 24000
llm_input_size: {llm_size}
llm_output_size: {llm_size}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

# model params
# for all class/function included in this repo, we use !<name> or !<new> for intialization, so that user may find all corresponding class/function according to one single yaml.
# for system/third_party class/function, we do not require this.
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {flow_size}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {flow_size}
        attention_heads: {enc_heads}
        linear_units: {enc_ffn}
        num_blocks: {enc_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {flow_size}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_channels}]
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_cond_channels}

# processor functions
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""

# A few sentences for a byte-level BPE that tokenises English sensibly (the real Qwen2 vocab is
# 151k entries; tests only need a working tokenizer with the same file format).
CORPUS = [
    "Hello world, this is a small test of the speech synthesis system.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "CosyVoice speaks English and Chinese; numbers, punctuation (and brackets) too!",
    "We generate random weights for tests: nothing here is a real model.",
]


def write_blank_en(d: str, s: dict, seed: int) -> None:
    """CosyVoice-BlankEN/: Qwen2 config, small BPE tokenizer, random weights (save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(d, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.model.save(d)  # vocab.json + merges.txt, the files Qwen2Tokenizer reads
    tok.save(os.path.join(d, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}
             for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "bos_token": None,
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
                   "added_tokens_decoder": added, "errors": "replace", "split_special_tokens": False,
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    fast = AutoTokenizer.from_pretrained(d)
    assert fast.decode(fast("Hello world")["input_ids"]) == "Hello world"
    # upstream adds 19 special tokens on load; the embedding table must cover them
    assert len(fast) + 19 <= s["qwen_vocab"], (len(fast), s["qwen_vocab"])

    # Qwen2.5's <|endoftext|> is 151643; the tiny vocab has its own id for it
    eot = 151643 if s["qwen_vocab"] > 151643 else tok.token_to_id("<|endoftext|>")
    cfg = Qwen2Config(
        vocab_size=s["qwen_vocab"], hidden_size=s["llm_size"], intermediate_size=s["qwen_ffn"],
        num_hidden_layers=s["qwen_layers"], num_attention_heads=s["qwen_heads"],
        num_key_value_heads=s["qwen_kv_heads"], max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
        sliding_window=32768, max_window_layers=s["qwen_layers"], bos_token_id=eot, eos_token_id=eot,
        attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    # bf16 like the published model.safetensors (it is overwritten by llm.pt anyway)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)


def write_onnx_standins(out: str, seed: int) -> None:
    """Tiny random ONNX graphs with the official I/O names, dtypes and shapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    # campplus: fbank [B,T,80] -> mean of squares over time -> Linear 80->192 -> [B,192]
    w = numpy_helper.from_array((rng.standard_normal((80, 192)) * 0.1).astype(np.float32), "w")
    g = helper.make_graph(
        # squared first: the real input is mean-subtracted fbank, whose plain time average is ~0
        [helper.make_node("Mul", ["input", "input"], ["squared"]),
         helper.make_node("ReduceMean", ["squared", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["output"])],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        [w, numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    _save(onnx, helper, g, os.path.join(out, "campplus.onnx"))

    # speech tokenizer v2: log-mel [1,128,T] (100 Hz) -> two stride-2 convs (k3,p1: 25 Hz,
    # T' = ceil(T/4) as upstream's tokenizer) -> project to 6561 codes -> argmax -> int32.
    # feats_length is accepted (as upstream feeds it) and masks nothing: batch 1 only.
    c1 = numpy_helper.from_array((rng.standard_normal((16, 128, 3)) * 0.05).astype(np.float32), "c1")
    c2 = numpy_helper.from_array((rng.standard_normal((16, 16, 3)) * 0.2).astype(np.float32), "c2")
    proj = numpy_helper.from_array(rng.standard_normal((16, 6561)).astype(np.float32), "proj")
    conv = dict(kernel_shape=[3], strides=[2], pads=[1, 1])
    g = helper.make_graph(
        [helper.make_node("Conv", ["feats", "c1"], ["h1"], **conv),
         helper.make_node("Tanh", ["h1"], ["a1"]),
         helper.make_node("Conv", ["a1", "c2"], ["h2"], **conv),
         helper.make_node("Transpose", ["h2"], ["h2t"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["h2t", "proj"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["idx64"], axis=2, keepdims=0),
         helper.make_node("Cast", ["idx64"], ["indices"], to=TensorProto.INT32),
         # keep feats_length a live input: output its value as a side result nobody reads
         helper.make_node("Identity", ["feats_length"], ["feats_length_out"])],
        "speech_tokenizer_v2_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [1, "T_tok"]),
         helper.make_tensor_value_info("feats_length_out", TensorProto.INT32, [1])],
        [c1, c2, proj])
    _save(onnx, helper, g, os.path.join(out, "speech_tokenizer_v2.onnx"))


def _save(onnx, helper, graph, path: str) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edge_runtime-testmodel")
    model.ir_version = 8  # readable by older onnxruntime too
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_folder(out: str, size: str, seed: int) -> dict:
    s = SIZES[size]
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    write_blank_en(os.path.join(out, "CosyVoice-BlankEN"), s, seed)
    with open(os.path.join(out, "cosyvoice2.yaml"), "w") as f:
        f.write(YAML.format(**s))
    torch.manual_seed(seed)
    mods = ref.build_modules(out)  # the reference's own classes, from the yaml just written
    counts = {}
    for name in ref.SECTIONS:
        sd = {k: v.detach().float().contiguous() for k, v in mods[name].state_dict().items()}
        torch.save(sd, os.path.join(out, f"{name}.pt"))
        counts[name] = sum(v.numel() for v in sd.values())
    write_onnx_standins(out, seed)
    torch.save({}, os.path.join(out, "spk2info.pt"))
    return {"dir": out, "size": size, "params": counts, "seconds": round(time.time() - t0, 1)}


def smoke() -> int:
    """Import and construct the three reference classes (tiny folder in a temp dir)."""
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice.hifigan.generator import HiFTGenerator
    from cosyvoice.llm.llm import Qwen2LM

    with tempfile.TemporaryDirectory() as d:
        info = write_folder(d, "tiny", 0)
        m = ref.load_model(d)
        for name, cls in (("llm", Qwen2LM), ("flow", CausalMaskedDiffWithXvec), ("hift", HiFTGenerator)):
            assert isinstance(m[name], cls), (name, type(m[name]))
            print(f"  {cls.__module__}.{cls.__name__}: {info['params'][name]:,} params")
    print(f"  smoke OK in {info['seconds']} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="folder to write")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="only check the reference classes build")
    a = p.parse_args(argv)
    if a.smoke:
        return smoke()
    if not a.out:
        p.error("OUT folder required")
    print(json.dumps(write_folder(a.out, a.size, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
