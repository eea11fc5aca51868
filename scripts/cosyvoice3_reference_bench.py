"""Time the CosyVoice3 reference (upstream's own modules, random weights) for scripts/bench_cosyvoice.py --version 3.

Run with the reference venv's python (scripts/cosyvoice_reference.sh) and a checkout of upstream
FunAudioLLM/CosyVoice (see scripts/cosyvoice3_fixtures.py for how to make one):

    .cosyvoice_ref/bin/python scripts/cosyvoice3_reference_bench.py MODEL_DIR OUT.json \
        [--upstream /work/cosyvoice_upstream] < request.json

MODEL_DIR is a CosyVoice3 folder in the official layout (scripts/cosyvoice3_testmodel.py writes one).
The request (JSON) has the fields of the CosyVoice2 one (scripts/cosyvoice_reference_bench.py):
text_ids, prompt_text_ids, prompt_speech_tokens, embedding [192], prompt_feat [frames][80], tokens,
threads, seed; and endofprompt_id (default 151646). Upstream asserts that 151646 (<|endofprompt|>
in the published vocabulary) is in the LM's text, so the prompt text ids must hold endofprompt_id;
any other id (a test vocabulary too small for 151646) replaces 151646 in that assert, nothing else.

Built as upstream's CosyVoice3 builds a folder: hyperpyyaml on cosyvoice3.yaml (llm/flow/hift
sections, qwen_pretrain_path = MODEL_DIR/CosyVoice-BlankEN), fp32, then llm.pt/flow.pt/hift.pt
loaded strictly. Measured as upstream runs on a CPU (fp32, no JIT/TensorRT/vLLM):
  lm          CosyVoice3LM.inference for exactly `tokens` tokens                  -> s
  flow        flow.inference(streaming=False, finalize=True) on those tokens      -> s
  hift        hift.inference(finalize=True) on that mel                           -> s
  stream      CosyVoice3Model.tts(stream=True) itself: LM in a thread, the main loop polling every
              0.1 s; each chunk re-runs the flow over all tokens so far (chunk masks) and re-vocodes
              the whole mel; first hop padded so prompt + hop is a multiple of 25, then the hop
              doubles up to 100; the last call runs the flow with full attention (finalize=True)
                                                                                  -> first audio, total
  peak_rss    ru_maxrss of this process
Two changes to upstream's run, both for random weights / transformers 5 (listed in the output):
  fixed length: every id >= 6561 stops CosyVoice3's LM and its minimum length masks only 6561, so
              random weights stop at once; the LM's sampling callable gets logp[6561:] = -inf before
              ras_sampling (ours: CosyVoice3LM.generate(end_only_after_min=True)), and both ratios
              are set so that min = max = `tokens`
  one-step mask: Qwen2Encoder.forward_one_step's length-1 mask is widened to the cache length
              (what transformers 4, which upstream pins, did; scripts/cosyvoice3_fixtures.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cosyvoice3_fixtures as fixtures  # noqa: E402  (import_upstream, the endofprompt patch, the mask)
from cosyvoice_reference_run import trimmed_yaml  # noqa: E402

UPSTREAM_ENDOFPROMPT = 151646
SPEECH_TOKENS = 6561


def ids(values) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.int64).reshape(1, -1), dtype=torch.int32)


def load_modules(model_dir: Path) -> dict:
    """llm/flow/hift as upstream's CosyVoice3 loads a folder: the yaml, then the .pt files strictly."""
    from hyperpyyaml import load_hyperpyyaml

    text = trimmed_yaml((model_dir / "cosyvoice3.yaml").read_text())
    conf = load_hyperpyyaml(text, overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
    # transformers 5 keeps the saved dtype in from_pretrained (bf16); upstream on a CPU is fp32
    mods = {k: conf[k].float() for k in ("llm", "flow", "hift")}
    for name, module in mods.items():
        state = torch.load(model_dir / f"{name}.pt", map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
        module.eval()
    return mods | {"sample_rate": int(conf.get("sample_rate", 24000))}


def ratio_for(n: int, text_len: int) -> float:
    """A token/text ratio whose min/max length is exactly n, computed as upstream does
    (int32 length tensor * float ratio, truncated)."""
    r = n / text_len
    while int(torch.tensor([text_len], dtype=torch.int32) * r) < n:
        r = float(np.nextafter(r, np.inf))
    return r


def fix_length(llm, n: int, text_len: int) -> None:
    """Make every LM call decode exactly n tokens (see the module notes)."""
    real_sampling, real_inference = llm.sampling, llm.inference

    def sampling(weighted_scores, decoded_tokens, top_k):
        weighted_scores[SPEECH_TOKENS:] = -float("inf")  # no stop id before max_len (= n)
        return real_sampling(weighted_scores, decoded_tokens, top_k)

    ratio = ratio_for(n, text_len)

    def inference(**kw):  # llm_job passes no ratios (upstream defaults 2 / 20)
        return real_inference(**kw | {"min_token_text_ratio": ratio, "max_token_text_ratio": ratio})

    llm.sampling, llm.inference = sampling, inference


def stream(model_mod, mods: dict, text, prompt_text, prompt_tok, prompt_feat, emb) -> tuple[float, float, int, int]:
    """One request through upstream's CosyVoice3Model.tts(stream=True) (a fresh model: its hop
    grows in place and is never reset). Returns first audio s, total s, samples, chunks."""
    model = model_mod.CosyVoice3Model(mods["llm"], mods["flow"], mods["hift"], fp16=False)
    first, samples, chunks = None, 0, 0
    start = time.perf_counter()
    for out in model.tts(text=text, flow_embedding=emb, prompt_text=prompt_text, llm_prompt_speech_token=prompt_tok,
                         flow_prompt_speech_token=prompt_tok, prompt_speech_feat=prompt_feat, stream=True):
        first = first or time.perf_counter() - start
        samples += out["tts_speech"].shape[1]
        chunks += 1
    total = time.perf_counter() - start
    return first or total, total, samples, chunks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--upstream", type=Path, default=Path("/work/cosyvoice_upstream"),
                   help="checkout of FunAudioLLM/CosyVoice (its cosyvoice/ package is imported)")
    a = p.parse_args()
    if not (a.upstream / "cosyvoice" / "cli" / "model.py").is_file():
        raise SystemExit(f"--upstream {a.upstream}: not a checkout of FunAudioLLM/CosyVoice "
                         "(no cosyvoice/cli/model.py)")
    req = json.loads(sys.stdin.read() or "{}")
    torch.set_num_threads(int(req.get("threads", 2)))
    up = fixtures.import_upstream(a.upstream)
    eop = int(req.get("endofprompt_id", UPSTREAM_ENDOFPROMPT))
    if eop not in req["prompt_text_ids"]:
        raise SystemExit(f"endofprompt_id {eop} is not in prompt_text_ids: upstream's CosyVoice3 LM asserts it")
    if eop != UPSTREAM_ENDOFPROMPT:
        fixtures.ENDOFPROMPT = eop  # patch_endofprompt substitutes this id for 151646
        fixtures.patch_endofprompt(up["llm"])
    mods = load_modules(a.model_dir)
    llm, flow, hift = mods["llm"], mods["flow"], mods["hift"]
    llm.llm.forward_one_step = fixtures.widened_one_step(llm.llm)
    n = int(req.get("tokens", 100))
    text, prompt_text, prompt_tok = ids(req["text_ids"]), ids(req["prompt_text_ids"]), ids(req["prompt_speech_tokens"])
    fix_length(llm, n, text.shape[1])
    emb = torch.tensor(req["embedding"], dtype=torch.float32).reshape(1, 192)
    prompt_feat = torch.tensor(req["prompt_feat"], dtype=torch.float32).reshape(1, -1, 80)
    torch.manual_seed(int(req.get("seed", 0)))
    res: dict = {"tokens": n, "version": 3}
    with torch.inference_mode():
        t0 = time.perf_counter()
        toks = [int(t) for t in llm.inference(
            text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32), prompt_text=prompt_text,
            prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32), prompt_speech_token=prompt_tok,
            prompt_speech_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
            embedding=torch.zeros(0, 192), sampling=25)]
        res["lm_s"], res["lm_tokens"] = time.perf_counter() - t0, len(toks)
        t0 = time.perf_counter()
        mel, _ = flow.inference(token=ids(toks), token_len=torch.tensor([len(toks)], dtype=torch.int32),
                                prompt_token=prompt_tok,
                                prompt_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
                                prompt_feat=prompt_feat,
                                prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32),
                                embedding=emb, streaming=False, finalize=True)
        res["flow_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav, _ = hift.inference(speech_feat=mel, finalize=True)
        res["hift_s"] = time.perf_counter() - t0
        res["audio_s"] = wav.shape[1] / mods["sample_rate"]
    if req.get("stream", True):
        first, total, samples, chunks = stream(up["model"], mods, text, prompt_text, prompt_tok, prompt_feat, emb)
        res |= {"stream_first_s": first, "stream_total_s": total, "stream_audio_s": samples / mods["sample_rate"],
                "stream_chunks": chunks}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["changes"] = ["sampling: logp[6561:] = -inf (fixed length)", "ratios: min = max = tokens / text tokens",
                      "Qwen2Encoder.forward_one_step: mask widened to the cache length"] + \
        ([f"<|endofprompt|> assert: id {eop} for 151646"] if eop != UPSTREAM_ENDOFPROMPT else [])
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
