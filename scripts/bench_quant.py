#!/usr/bin/env python
"""Weight-only quantization, measured: what runtime/backends/quantized_linear.py's int8 / int4
layers cost in accuracy, bytes and time on this CPU, in one run.

(a) One 2048 -> 5632 -> 2048 gated MLP (SwiGLU, like an LM's FFN: 34.6M params, N(0, 0.02) weights),
    bf16 activations: per variant (fp32, bf16, int8, int4 at group sizes 32 / 64 / 128) the weight
    MB, ms per call at 1 and 32 tokens (median of interleaved repeats) and the relative output error
    ||y - y_fp32|| / ||y_fp32|| of the MLP and of its worst Linear (the table of LARGE_MODELS.md
    "Quantization on this CPU").
(b) Tiny random LMs (a Llama; the LMs of tests/hf_tiny_higgs.py and tests/hf_tiny_vibevoice.py when
    present): every nn.Linear of the decoder layers quantized (what a family marks quantizable),
    computing in bf16. Per precision: teacher-forced KL of the next-token distributions vs the bf16
    model over one fixed random sequence, the relative error of each quantized Linear on the
    activations it really sees there (median / max), greedy tokens/s and the weight bytes.
Checks (PASS/FAIL lines): int8 error <= 0.02 per layer (the MLP, its Linears and every Linear of the
tiny LMs); int8 at 1 token no slower than bf16 (the MLP).

    .venv/bin/python scripts/bench_quant.py            # prints the tables, writes bench_results/bench_quant.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from edge_runtime.policy.quantization import INT4_GROUP_SIZE  # noqa: E402
from edge_runtime.runtime.backends.quantized_linear import QuantizedLinear  # noqa: E402

GROUPS = (32, 64, 128)
INT8_MAX_ERROR = 0.02
MLP_SHAPE = (2048, 5632)
BF16 = torch.bfloat16


def variants() -> list[tuple[str, str, int]]:
    """(name, precision, group): fp32 / bf16 rows have precision "" and group 0."""
    return [("fp32", "", 0), ("bf16", "", 0), ("int8", "int8", 0),
            *[(f"int4 g{g}", "int4", g) for g in GROUPS]]


# -- (a) the MLP -----------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def quantized_copy(model: nn.Module, within: list[str], precision: str, group: int,
                   dtype: torch.dtype = BF16) -> nn.Module:
    """``model`` (fp32) copied: its Linears inside the modules named ``within`` quantized from the fp32
    weights, everything else cast to ``dtype``. ``precision`` "" is a plain cast."""
    out = copy.deepcopy(model)
    if precision:
        for prefix in within:
            top = out.get_submodule(prefix) if prefix else out
            for name, module in list(top.named_modules()):
                if isinstance(module, nn.Linear):
                    q = QuantizedLinear.from_linear(module, precision, dtype, group_size=group or INT4_GROUP_SIZE)
                    parent, _, attr = name.rpartition(".")
                    setattr(top.get_submodule(parent) if parent else top, attr, q)
    return out.to(dtype).eval()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def interleaved_ms(calls: dict[str, callable], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each callable, timed round-robin so machine noise hits all alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_mlp(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    hidden, ffn = MLP_SHAPE
    base = MLP(hidden, ffn).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    x32 = torch.randn(32, hidden, generator=torch.Generator().manual_seed(1)).to(BF16)  # bf16 activations
    x1 = x32[:1].clone()
    with torch.inference_mode():
        ref = base(x32.float())
        inner = {"gate_proj": x32.float(), "up_proj": x32.float(),
                 "down_proj": (nn.functional.silu(base.gate_proj(x32.float())) * base.up_proj(x32.float())).to(BF16)}
        inner_ref = {k: getattr(base, k)(v.float()) for k, v in inner.items()}
    models, rows = {}, []
    for name, precision, group in variants():
        dtype = torch.float32 if name == "fp32" else BF16
        model = base if name == "fp32" else quantized_copy(base, [""], precision, group)
        models[name] = model
        with torch.inference_mode():
            y = model(x32.to(dtype))
            layer_errors = {k: rel_error(getattr(model, k)(v.to(dtype)), inner_ref[k]) for k, v in inner.items()}
        rows.append({"variant": name, "precision": precision or name, "group_size": group or None,
                     "mb": weight_bytes(model) / 1e6, "error": None if name == "fp32" else rel_error(y, ref),
                     "linear_errors": None if name == "fp32" else layer_errors})
    for tokens, reps in ((1, repeats), (32, max(5, repeats // 3))):
        calls = {}
        for name, model in models.items():
            x = (x1 if tokens == 1 else x32).to(torch.float32 if name == "fp32" else BF16)
            calls[name] = (lambda m=model, x=x: m(x))
        with torch.inference_mode():
            ms = interleaved_ms(calls, reps)
        for row in rows:
            row[f"ms_{tokens}"] = ms[row["variant"]]
    return rows


# -- (b) tiny LMs --------------------------------------------------------------------------------

class TinyLM:
    """A model, the decoder layers quantization touches, and how to run it teacher-forced and greedily."""

    def __init__(self, name: str, model: nn.Module, layers: str, sequence: torch.Tensor, logits, step,
                 prompt: int = 16) -> None:
        self.name, self.model, self.layers, self.sequence = name, model.eval(), layers, sequence
        self.logits, self.step, self.prompt = logits, step, prompt

    def layer_names(self) -> list[str]:
        return [f"{self.layers}.{i}" for i in range(len(self.model.get_submodule(self.layers)))]


def tiny_llama() -> TinyLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    seq = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))

    def step(m, ids, cache):
        out = m(input_ids=ids, cache=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1), out.cache

    return TinyLM("tiny Llama", model, "model.layers", seq, lambda m, s: m(input_ids=s).logits, step)


def tiny_vibevoice() -> TinyLM | None:
    try:
        import hf_tiny_vibevoice as tiny
        from transformers import VibeVoiceForConditionalGeneration
    except ImportError:
        return None
    config = tiny.tiny_config(tiny.build_tokenizer())
    torch.manual_seed(0)
    model = VibeVoiceForConditionalGeneration(config)
    vocab = config.text_config.vocab_size
    seq = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(3))

    def logits(m, s):
        return m.lm_head(m.model.language_model(input_ids=s).last_hidden_state)

    def step(m, ids, cache):
        out = m.model.language_model(input_ids=ids, cache=cache, use_cache=True)
        return m.lm_head(out.last_hidden_state[:, -1:]).argmax(-1), out.cache

    return TinyLM("tiny VibeVoice LM (Qwen2)", model, "model.language_model.layers", seq, logits, step)


def tiny_higgs() -> TinyLM | None:
    try:
        import hf_tiny_higgs as tiny
        from transformers import HiggsAudioV2ForConditionalGeneration
    except ImportError:
        return None
    config = tiny.model_config(tiny.build_tokenizer())
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration(config)
    books, size = tiny.NUM_CODEBOOKS, tiny.CODEC_CODEBOOK + 2
    # audio frames: the per-frame path (attention + audio FFN) a quantized LM layer serves
    seq = torch.randint(0, tiny.CODEC_CODEBOOK, (1, 64, books), generator=torch.Generator().manual_seed(3))

    def logits(m, s):
        out = m(audio_input_ids=s).logits
        return out.view(*out.shape[:2], books, size)

    def step(m, frame, cache):
        out = m(audio_input_ids=frame, cache=cache, use_cache=True)
        return out.logits[:, -1:].view(1, 1, books, size).argmax(-1), out.cache

    return TinyLM("tiny Higgs v2 LM (audio frames)", model, "model.layers", seq, logits, step)


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions (and codebooks) of KL(p_ref || p)."""
    lp_ref = torch.log_softmax(ref_logits.float(), -1)
    lp = torch.log_softmax(logits.float(), -1)
    return float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())


def captured_inputs(lm: TinyLM, model: nn.Module) -> dict[str, torch.Tensor]:
    """The input each decoder-layer Linear of the bf16 ``model`` sees on the teacher-forced sequence."""
    seen, handles = {}, []
    for layer in lm.layer_names():
        for name, module in model.get_submodule(layer).named_modules():
            if isinstance(module, nn.Linear):
                def hook(_m, args, key=f"{layer}.{name}"):
                    if args[0].numel():  # a dual-FFN layer's text MLP sees no audio frame
                        seen[key] = args[0].detach().reshape(-1, args[0].shape[-1])
                handles.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        lm.logits(model, lm.sequence)
    for h in handles:
        h.remove()
    return seen


def greedy_tokens_per_s(lm: TinyLM, model: nn.Module, new_tokens: int) -> float:
    seq = lm.sequence[:, :lm.prompt]
    with torch.inference_mode():
        nxt, cache = lm.step(model, seq, None)
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt, cache = lm.step(model, nxt, cache)
        return new_tokens / (time.perf_counter() - start)


def bench_lm(lm: TinyLM, new_tokens: int, repeats: int) -> list[dict]:
    base = lm.model.float()
    layers = lm.layer_names()
    bf16 = quantized_copy(base, layers, "", 0)
    inputs = captured_inputs(lm, bf16)
    with torch.inference_mode():
        ref = lm.logits(bf16, lm.sequence)
    rows, models = [], {}
    for name, precision, group in variants():
        model = base if name == "fp32" else (bf16 if name == "bf16" else quantized_copy(base, layers, precision, group))
        models[name] = model
        dtype = torch.float32 if name == "fp32" else BF16
        errors, fallback = [], 0
        if precision:
            with torch.inference_mode():
                for key, x in inputs.items():
                    q = model.get_submodule(key)
                    errors.append(rel_error(q(x.to(dtype)), base.get_submodule(key)(x.float())))
                    fallback += precision == "int4" and q.precision == "int8"
        with torch.inference_mode():
            divergence = kl(ref, lm.logits(model, lm.sequence))
        rows.append({"variant": name, "kl_vs_bf16": divergence, "bytes": weight_bytes(model),
                     "layer_error_median": statistics.median(errors) if errors else None,
                     "layer_error_max": max(errors) if errors else None,
                     "int4_layers_stored_int8": fallback if precision == "int4" else None})
    for model in models.values():  # warm-up: first calls pick and prepare kernels
        greedy_tokens_per_s(lm, model, 4)
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):  # interleaved, as the MLP timings
        for key, model in models.items():
            speeds[key].append(greedy_tokens_per_s(lm, model, new_tokens))
    for row in rows:
        row["tokens_per_s"] = statistics.median(speeds[row["variant"]])
        row["tokens_per_s_runs"] = [round(v, 1) for v in speeds[row["variant"]]]
    return rows


# -- report ----------------------------------------------------------------------------------------

def print_mlp(rows: list[dict]) -> None:
    print(f"## (a) one {MLP_SHAPE[0]}->{MLP_SHAPE[1]}->{MLP_SHAPE[0]} gated MLP, bf16 activations, "
          f"{torch.get_num_threads()} threads; error vs fp32")
    print("| variant | MB | ms 1 token | ms 32 tokens | rel. error (MLP) | worst Linear |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.4f}"
        worst = "-" if r["linear_errors"] is None else f"{max(r['linear_errors'].values()):.4f}"
        print(f"| {r['variant']} | {r['mb']:.1f} | {r['ms_1']:.2f} | {r['ms_32']:.2f} | {err} | {worst} |")


def print_lm(name: str, rows: list[dict]) -> None:
    print(f"\n## (b) {name}: decoder-layer Linears quantized, bf16 compute; KL vs bf16 (teacher-forced)")
    print("| variant | weight MB | KL vs bf16 | layer error median / max | tokens/s | int4 layers kept int8 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["layer_error_max"] is None else f"{r['layer_error_median']:.4f} / {r['layer_error_max']:.4f}"
        kept = "-" if r["int4_layers_stored_int8"] is None else str(r["int4_layers_stored_int8"])
        print(f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {r['kl_vs_bf16']:.2e} | {err} | "
              f"{r['tokens_per_s']:.0f} | {kept} |")


def checks(mlp: list[dict], lms: dict[str, list[dict]]) -> dict[str, dict]:
    by = {r["variant"]: r for r in mlp}
    int8 = by["int8"]
    worst = max([int8["error"], *int8["linear_errors"].values()]
                + [r["layer_error_max"] for rows in lms.values() for r in rows if r["variant"] == "int8"])
    return {"int8_layer_error": {"pass": worst <= INT8_MAX_ERROR, "worst": worst, "bound": INT8_MAX_ERROR},
            "int8_1_token_vs_bf16": {"pass": int8["ms_1"] <= by["bf16"]["ms_1"], "int8_ms": int8["ms_1"],
                                     "bf16_ms": by["bf16"]["ms_1"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per MLP variant at 1 token")
    parser.add_argument("--lm-repeats", type=int, default=9, help="greedy runs per LM variant (interleaved)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_quant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mlp = bench_mlp(args.repeats)
    print_mlp(mlp)
    lms = {}
    for make in (tiny_llama, tiny_vibevoice, tiny_higgs):
        lm = make()
        if lm is None:
            continue
        lms[lm.name] = bench_lm(lm, args.new_tokens, args.lm_repeats)
        print_lm(lm.name, lms[lm.name])

    result = checks(mlp, lms)
    c = result["int8_layer_error"]
    print(f"\n{'PASS' if c['pass'] else 'FAIL'}: int8 relative error per layer {c['worst']:.4f} <= {c['bound']}")
    c = result["int8_1_token_vs_bf16"]
    print(f"{'PASS' if c['pass'] else 'FAIL'}: int8 at 1 token {c['int8_ms']:.2f} ms, no slower than bf16 "
          f"{c['bf16_ms']:.2f} ms")
    int4 = [r for r in mlp if r["precision"] == "int4"]
    print("int4 group sizes (MLP): " + "; ".join(f"g{r['group_size']}: error {r['error']:.4f}, {r['mb']:.1f} MB, "
                                                  f"{r['ms_1']:.2f} / {r['ms_32']:.2f} ms" for r in int4))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
        "int4_group_size_in_policy": INT4_GROUP_SIZE, "mlp": mlp, "lms": lms, "checks": result}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(c["pass"] for c in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
