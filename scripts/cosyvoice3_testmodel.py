"""Write a random-weight CosyVoice3 model folder in the official layout, from edge_runtime's own modules.

    .venv/bin/python scripts/cosyvoice3_testmodel.py OUT_DIR [--size tiny|published] [--seed N]

No upstream code is needed (CI has none): the modules' keys and shapes equal upstream's (the tests
compare them with tests/fixtures/cosyvoice3/manifest.json, made from upstream's own classes), so
the files are what upstream would load. Layout (as Fun-CosyVoice3-0.5B-2512 ships it):

    cosyvoice3.yaml            upstream's hyperpyyaml (the fixture script's text, sizes substituted)
    llm.pt flow.pt hift.pt     plain fp32 state dicts (random init)
    CosyVoice-BlankEN/         Qwen2 config.json + a small byte-level BPE tokenizer (vocab.json,
                               merges.txt); CosyVoice3's ~300 added tokens follow its ids
    campplus.onnx              stand-in with the official I/O names (see cosyvoice_testmodel.py)
    speech_tokenizer_v3.onnx   stand-in: "feats" [1,128,T] + "feats_length" -> "indices" [1,T/4]
    spk2info.pt                empty dict

Tiny weights are for the CLI, server and backend tests (parity is proven on the fixtures);
published-size ones (~3.7 GB) for scripts/bench_cosyvoice.py --version 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cosyvoice3_fixtures as fixtures  # noqa: E402  (the yaml text and the published sizes)
import cosyvoice_testmodel as v2_testmodel  # noqa: E402  (tokenizer and ONNX stand-ins)

SIZES = {
    # the tiny vocabulary holds the ~400 BPE entries + CosyVoice3's ~300 added tokens
    "tiny": {**fixtures.TINY, "qwen_vocab": 1024},
    "published": dict(llm_size=896, qwen_layers=24, qwen_heads=14, qwen_kv_heads=2, qwen_ffn=4864,
                      qwen_vocab=151936, lookahead_channels=1024, dit_dim=1024, dit_depth=22, dit_heads=16,
                      dit_dim_head=64, dit_ff_mult=2, hift_channels=512, f0_cond_channels=512),
}


def write_folder(out: Path, size: str, seed: int) -> dict:
    from edge_runtime.models.cosyvoice import dit, hift_causal, llm

    s = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # the BPE files, and a Qwen2 config of this size (its random model.safetensors is never read)
    v2_testmodel.write_blank_en(str(out / "CosyVoice-BlankEN"), {**s, "qwen_vocab": s["qwen_vocab"]}, seed)
    (out / "cosyvoice3.yaml").write_text(fixtures.TINY_YAML.format(**s))
    torch.manual_seed(seed)
    cfg = llm.LMConfig.from_folder(out, version=3)
    modules = {"llm": llm.model_class(cfg)(cfg),
               "flow": dit.build(dit.DiTFlowConfig.from_yaml(out / "cosyvoice3.yaml")),
               "hift": hift_causal.build(hift_causal.CausalHiFTConfig.from_yaml(out / "cosyvoice3.yaml"))}
    with torch.no_grad():
        # random F0 weights put every frame below the 10 Hz voiced threshold (a silent source)
        classifier = modules["hift"].f0_predictor.classifier
        classifier.weight.mul_(1500.0)
        classifier.bias.fill_(120.0)
    counts = {}
    for name, module in modules.items():
        state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
        torch.save(state, out / f"{name}.pt")
        counts[name] = sum(v.numel() for v in state.values())
    v2_testmodel.write_onnx_standins(str(out), seed)
    (out / "speech_tokenizer_v2.onnx").rename(out / "speech_tokenizer_v3.onnx")
    torch.save({}, out / "spk2info.pt")  # written last: its presence marks a complete folder
    return {"dir": str(out), "size": size, "params": counts, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(write_folder(a.out, a.size, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
