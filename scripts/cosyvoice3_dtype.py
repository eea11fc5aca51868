#!/usr/bin/env python
"""CosyVoice3's flow (DiT) in bf16 / fp16 on the CPU: the mel's error against fp32, and which parts cause it.

Two models with random weights (no real weights exist offline): the tiny test fixture
(tests/fixtures/cosyvoice3, when present; else a tiny random one) and a mid-size DiT (dim 1024,
16 heads, depth 4: the published block at a sixth of the depth). One offline inference each
(prompt + target frames as below, fixed noise), in fp32 and then under these precisions:

    all                        the whole flow in <dt>, as this package runs it: the estimator and
                               token side in <dt>; rotary angles, flow times, noise and the Euler
                               state in fp32 (dit/layers.py, dit/model.py, flow/cfm.py solver_dtype)
    all, upstream rotary       ... with rotary angles computed in <dt> (what upstream does once its
                               inv_freq buffer is cast to half)
    all, solver in <dt>        ... with flow times, noise and Euler state in <dt> (upstream: t_span and
                               x in mu's dtype)
    all, <part> fp32           "all" with <part> in fp32 too (mid-size model: only with --full-mid)
    only <part>                everything fp32 except <part>

<part> is one of: token_side (embedding, pre-lookahead convs, speaker projection), time_embed,
adaln (every AdaLN modulation projection), input_embed (input projection + conv position
embedding), attention, feed_forward, proj_out; in the "only" rows also dit_blocks (the blocks
whole: attention, feed-forward, norms and the residual stream) and estimator (the whole DiT).
Besides the table, the largest |activation| each part produces in fp32 (fp16 overflows past
65504) and the rotary angle error of half-precision positions at a few frame indices. Prints
markdown and writes JSON (default bench_results/cosyvoice3_dtype.json). Random weights say nothing
about outliers trained weights may have: treat fp16 overflow margins as a lower bound on risk.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.models.cosyvoice import dit  # noqa: E402
from edge_runtime.models.cosyvoice.dit import layers as L  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "cosyvoice3"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = {
    "token_side": lambda name, m: name in ("input_embedding", "pre_lookahead_layer", "spk_embed_affine_layer"),
    "time_embed": lambda name, m: isinstance(m, L.TimestepEmbedding),
    "adaln": lambda name, m: isinstance(m, L.Modulation),
    "input_embed": lambda name, m: isinstance(m, L.InputEmbedding),
    "attention": lambda name, m: isinstance(m, L.Attention),
    "feed_forward": lambda name, m: isinstance(m, L.FeedForward),
    "proj_out": lambda name, m: name == "decoder.estimator.proj_out",
    "dit_blocks": lambda name, m: isinstance(m, L.DiTBlock),  # attention, ff, residual stream, norms (not AdaLN)
    "estimator": lambda name, m: name == "decoder.estimator",
}
WHOLE = ("dit_blocks", "estimator")  # groups of the others: only in the "only" rows


def tiny_model() -> tuple[str, dit.CausalFlowDiT]:
    yaml_path, weights = FIXTURES / "cosyvoice3.yaml", FIXTURES / "flow.safetensors"
    if yaml_path.is_file() and weights.is_file():
        from safetensors.torch import load_file

        flow = dit.build(dit.DiTFlowConfig.from_yaml(yaml_path))
        flow.load_state_dict(load_file(weights), strict=True)
        return "tiny (fixture)", flow.eval()
    torch.manual_seed(0)
    cfg = dit.DiTFlowConfig(dim=64, depth=2, heads=4, head_dim=16, lookahead_channels=32)
    return "tiny (random)", dit.build(cfg).eval()


def mid_model() -> tuple[str, dit.CausalFlowDiT]:
    torch.manual_seed(0)
    cfg = dit.DiTFlowConfig(dim=1024, depth=4, heads=16, head_dim=64)
    return "mid (1024 x 4)", dit.build(cfg).eval()


def part_modules(flow: torch.nn.Module, part: str) -> list[torch.nn.Module]:
    return [m for name, m in flow.named_modules() if PARTS[part](name, m)]


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def run_in(module: torch.nn.Module, inner: torch.dtype, outer: torch.dtype) -> None:
    """Make ``module`` compute in ``inner`` inside a model computing in ``outer``: its weights cast,
    its inputs cast on the way in (attention: only x; its rotary tables stay as given), its output
    cast back."""
    module.to(inner)
    first_only = isinstance(module, L.Attention)

    def pre(_, args):
        return (_cast(args[0], inner), *args[1:]) if first_only else _cast(args, inner)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(lambda _m, _a, out: _cast(out, outer))


def upstream_rotary(self: L.RotaryEmbedding, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x-transformers once the model is cast: positions and angles in the buffer's dtype."""
    angle = torch.arange(start, end, device=self.inv_freq.device).to(self.inv_freq.dtype)[:, None] * self.inv_freq
    return angle.cos(), angle.sin()


def variants(dtype: torch.dtype, short: bool = False) -> list[tuple[str, object]]:
    """(label, setup(flow) -> execution dtype) for every row of the table (``short``: without the
    "all, <part> fp32" rows)."""

    def whole(flow):
        flow.to(dtype)
        return dtype

    def rotary(flow):
        flow.to(dtype)
        flow.decoder.estimator.rotary_embed.forward = upstream_rotary.__get__(flow.decoder.estimator.rotary_embed)
        return dtype

    def solver_half(flow):
        flow.to(dtype)
        flow.decoder.solver_dtype = None
        return dtype

    def all_but(part):
        def setup(flow):
            flow.to(dtype)
            for m in part_modules(flow, part):
                run_in(m, torch.float32, dtype)
            return dtype
        return setup

    def only(part):
        def setup(flow):
            for m in part_modules(flow, part):
                run_in(m, dtype, torch.float32)
            if part == "dit_blocks":  # their AdaLN projections run in the plan, outside the blocks' forward
                for m in part_modules(flow, "adaln"):
                    m.float()
            return torch.float32
        return setup

    rows = [("all", whole), ("all, upstream rotary", rotary), ("all, solver in <dt> (upstream)", solver_half)]
    if not short:
        rows += [(f"all, {p} fp32", all_but(p)) for p in PARTS if p not in WHOLE]
    rows += [(f"only {p}", only(p)) for p in PARTS]
    return rows


def activation_peaks(flow: torch.nn.Module, run) -> dict[str, float]:
    """Largest |output| each part produces in fp32."""
    peaks = {p: 0.0 for p in PARTS if p not in WHOLE}
    handles = []
    for part in peaks:
        for m in part_modules(flow, part):
            def hook(_m, _a, out, part=part):
                if out.numel():
                    peaks[part] = max(peaks[part], float(out.detach().abs().max()))
            handles.append(m.register_forward_hook(hook))
    run(flow)
    for h in handles:
        h.remove()
    return peaks


def rotary_angle_errors(head_dim: int = 64) -> list[dict]:
    """Largest angle error (radians) of half-precision positions x frequencies at a few frames."""
    rot = L.RotaryEmbedding(head_dim)
    rows = []
    for frame in (100, 256, 1000, 3000, 15000):
        ref = frame * rot.inv_freq.double()
        row = {"frame": frame}
        for label, dt in DTYPES.items():
            inv = rot.inv_freq.to(dt)
            angle = torch.tensor(float(frame)).to(dt) * inv
            row[label] = float((angle.double() - ref).abs().max())
        rows.append(row)
    return rows


def measure(label: str, flow: dit.CausalFlowDiT, prompt_tokens: int, tokens: int, short: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    cfg = flow.cfg
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=gen)
    target = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen)
    feat = torch.randn(cfg.token_mel_ratio * prompt_tokens, cfg.mel_bins, generator=gen)
    embedding = torch.randn(cfg.spk_embed_dim, generator=gen)
    noise = torch.randn(1, cfg.mel_bins, cfg.token_mel_ratio * (prompt_tokens + tokens), generator=gen)

    def run(model):
        return model.inference(target, prompt, feat, embedding, noise=noise)

    started = time.perf_counter()
    reference = run(flow)
    seconds = time.perf_counter() - started
    scale = float(reference.abs().max())
    result = {"model": label, "config": {k: getattr(cfg, k) for k in ("dim", "depth", "heads", "head_dim")},
              "frames": cfg.token_mel_ratio * (prompt_tokens + tokens), "mel_max_abs_fp32": scale,
              "fp32_seconds": round(seconds, 2), "peaks_fp32": activation_peaks(flow, run), "rows": []}
    for dt_label, dtype in DTYPES.items():
        for row, setup in variants(dtype, short):
            model = copy.deepcopy(flow)
            model.set_execution("cpu", setup(model))
            mel = run(model)
            err = (mel - reference).abs()
            result["rows"].append({"dtype": dt_label, "variant": row, "max_abs": float(err.max()),
                                   "mean_abs": float(err.mean()), "finite": bool(torch.isfinite(mel).all())})
    return result


def print_tables(results: list[dict], angles: list[dict]) -> None:
    for res in results:
        print(f"\n### {res['model']}: {res['frames']} frames, max |mel| fp32 {res['mel_max_abs_fp32']:.3g}, "
              f"fp32 run {res['fp32_seconds']} s\n")
        print("| variant | bf16 max | bf16 mean | fp16 max | fp16 mean |")
        print("|---|---|---|---|---|")
        by = {(r["dtype"], r["variant"]): r for r in res["rows"]}
        for variant in dict.fromkeys(r["variant"] for r in res["rows"]):
            cells = []
            for dt in DTYPES:
                r = by[(dt, variant)]
                cells += [f"{r['max_abs']:.2e}" if r["finite"] else "non-finite", f"{r['mean_abs']:.2e}"]
            print(f"| {variant} | " + " | ".join(cells) + " |")
        print("\nlargest |output| in fp32: " + ", ".join(f"{p} {v:.3g}" for p, v in res["peaks_fp32"].items()))
    print("\n### rotary angle error of half-precision positions (radians, head_dim 64)\n")
    print("| frame | bf16 | fp16 |")
    print("|---|---|---|")
    for row in angles:
        print(f"| {row['frame']} | {row['bf16']:.3g} | {row['fp16']:.3g} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "cosyvoice3_dtype.json")
    ap.add_argument("--prompt-tokens", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=40, help="target tokens (2 frames each)")
    ap.add_argument("--skip-mid", action="store_true", help="only the tiny model (seconds instead of minutes)")
    ap.add_argument("--full-mid", action="store_true",
                    help="the mid-size model with every row (half-precision matmuls are slow on CPUs without "
                         "bf16/fp16 instructions: ~25 runs of ~1 min each on a 2-core AVX2 machine)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [(*tiny_model(), False)] + ([] if args.skip_mid else [(*mid_model(), not args.full_mid)])
    results = [measure(label, flow, args.prompt_tokens, args.tokens, short) for label, flow, short in models]
    angles = rotary_angle_errors()
    print_tables(results, angles)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": results, "rotary_angle_error": angles}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
