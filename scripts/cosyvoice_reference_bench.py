"""Time the CosyVoice2 reference (upstream's modules, random weights) for scripts/bench_cosyvoice.py.

Run with the reference venv's python (built by scripts/cosyvoice_reference.sh):

    .cosyvoice_ref/bin/python scripts/cosyvoice_reference_bench.py MODEL_DIR OUT.json < request.json

The request (JSON) names the inputs both sides use: text_ids, prompt_text_ids, prompt_speech_tokens,
embedding [192], prompt_feat [frames][80], tokens (exact number of speech tokens), threads, seed.

Measured, as upstream runs them on a CPU:
  lm          Qwen2LM.inference for exactly `tokens` tokens (min = max ratio)       -> ms per token
  flow        flow.inference(streaming=False) on those tokens                      -> s
  hift        hift.inference on that mel                                            -> s
  stream      upstream's streaming loop (CosyVoice2Model.tts, stream=True): the LM in a thread, the
              main loop polling every 0.1 s and vocoding each hop of 25 (+ prompt padding) + 3 tokens
              with token2wav (the flow re-run over all tokens so far)               -> first audio, total
  peak_rss    ru_maxrss of this process
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cosyvoice_reference_run as ref  # noqa: E402  (same folder)


def ids(values) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.int64).reshape(1, -1), dtype=torch.int32)


def lm_tokens(llm, text, prompt_text, prompt_tok, n: int):
    """Exactly n tokens: upstream's min and max lengths are text_len * ratio."""
    ratio = n / text.shape[1]
    return llm.inference(text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
                         prompt_text=prompt_text,
                         prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32),
                         prompt_speech_token=prompt_tok,
                         prompt_speech_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
                         embedding=torch.zeros(1, 0), sampling=25, max_token_text_ratio=ratio,
                         min_token_text_ratio=ratio)


def stream(model, llm, text, prompt_text, prompt_tok, prompt_feat, emb, n: int) -> tuple[float, float, int]:
    """Upstream's CosyVoice2Model.tts(stream=True) loop (this package's CosyVoice2Model has no LM: the
    LM thread is upstream's llm_job)."""
    uid = "bench"
    tokens: list[int] = []
    done = threading.Event()

    def llm_job():
        with torch.inference_mode():
            for t in lm_tokens(llm, text, prompt_text, prompt_tok, n):
                tokens.append(int(t))
        done.set()

    start = time.perf_counter()
    first = None
    samples = 0
    model.hift_cache_dict[uid] = None
    worker = threading.Thread(target=llm_job)
    worker.start()
    hop, look = model.token_hop_len, model.flow.pre_lookahead_len
    pad = int(np.ceil(prompt_tok.shape[1] / hop) * hop - prompt_tok.shape[1])
    offset = 0
    with torch.inference_mode():
        while True:
            time.sleep(0.1)
            this_hop = hop + pad if offset == 0 else hop
            if len(tokens) - offset >= this_hop + look:
                chunk = torch.tensor([tokens[:offset + this_hop + look]])
                wav = model.token2wav(token=chunk, prompt_token=prompt_tok, prompt_feat=prompt_feat, embedding=emb,
                                      token_offset=offset, uuid=uid, stream=True, finalize=False)
                samples += wav.shape[1]
                first = first or time.perf_counter() - start
                offset += this_hop
            if done.is_set() and len(tokens) - offset < this_hop + look:
                break
        worker.join()
        wav = model.token2wav(token=torch.tensor([tokens]), prompt_token=prompt_tok, prompt_feat=prompt_feat,
                              embedding=emb, token_offset=offset, uuid=uid, finalize=True)
        samples += wav.shape[1]
    total = time.perf_counter() - start
    return first or total, total, samples


def main() -> int:
    model_dir, out_path = sys.argv[1], sys.argv[2]
    req = json.loads(sys.stdin.read() or "{}")
    torch.set_num_threads(int(req.get("threads", 2)))
    m = ref.load_model(model_dir)
    llm, flow, hift = m["llm"], m["flow"], m["hift"]
    n = int(req.get("tokens", 100))
    text, prompt_text, prompt_tok = ids(req["text_ids"]), ids(req["prompt_text_ids"]), ids(req["prompt_speech_tokens"])
    emb = torch.tensor(req["embedding"], dtype=torch.float32).reshape(1, 192)
    prompt_feat = torch.tensor(req["prompt_feat"], dtype=torch.float32).reshape(1, -1, 80)
    torch.manual_seed(int(req.get("seed", 0)))
    res: dict = {"tokens": n}
    with torch.inference_mode():
        t0 = time.perf_counter()
        toks = [int(t) for t in lm_tokens(llm, text, prompt_text, prompt_tok, n)]
        res["lm_s"] = time.perf_counter() - t0
        res["lm_tokens"] = len(toks)
        t0 = time.perf_counter()
        mel, _ = flow.inference(token=ids(toks), token_len=torch.tensor([len(toks)], dtype=torch.int32),
                                prompt_token=prompt_tok,
                                prompt_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
                                prompt_feat=prompt_feat,
                                prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32),
                                embedding=emb, streaming=False, finalize=True)
        res["flow_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav, _ = hift.inference(speech_feat=mel)
        res["hift_s"] = time.perf_counter() - t0
        res["audio_s"] = wav.shape[1] / m["sample_rate"]
    from cosyvoice.cli.model import CosyVoice2Model

    model = CosyVoice2Model(llm=None, flow=flow, hift=hift, fp16=False)
    if req.get("stream", True):
        first, total, samples = stream(model, llm, text, prompt_text, prompt_tok, prompt_feat, emb, n)
        res |= {"stream_first_s": first, "stream_total_s": total, "stream_audio_s": samples / m["sample_rate"]}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
