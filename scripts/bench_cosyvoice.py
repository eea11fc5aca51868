"""CosyVoice2: edge_runtime's family vs the reference implementation, same random weights, same inputs.

    python scripts/bench_cosyvoice.py [--model DIR] [--tokens 100] [--requests 100] [--out FILE.json]
    python scripts/bench_cosyvoice.py --version 3 [--upstream DIR] [--model DIR] [--tokens 100] [--requests N]

DIR is a CosyVoice2 folder in the official layout; without --model a published-size folder (random
weights, ~2.6 GB) is written once to ~/.cache/edge_runtime/bench/cosyvoice2-published by
scripts/cosyvoice_testmodel.py. The reference (upstream's modules, .cosyvoice_ref venv built by
scripts/cosyvoice_reference.sh) runs first in a subprocess, then ours in this process, one after the
other on the same CPU threads. Random weights never stop by themselves, so both sides generate exactly
--tokens speech tokens (upstream: min = max token/text ratio).

Rows (both sides):  LM ms per token; flow and HiFT seconds per second of audio (offline, on the same
tokens); total = LM + flow + HiFT for one request; time to first audio when streaming a text of
>= 200 characters with a prepared voice (upstream: its tts(stream=True) loop with the LM in a thread;
ours: also on the voice's first use, before the flow's prompt work kept at preparation); peak RSS.
Ours runs as the cpu profile ships it: the LM reads bf16 weights (precision.cpu_decoder_dtype; decoding
is bandwidth-bound), flow and HiFT compute in fp32. Upstream on a CPU runs fp32 only (it turns fp16 off
without CUDA). The rows "LM, fp32 weights" and "total, all fp32" time our LM with fp32 weights on the
same tokens: the same-precision comparison.
Ours only: RSS drift over --requests streamed requests through the runtime (per-request cleanup; short
sentences capped at 8 tokens, no voice prompt, to keep 100 requests to minutes), from the end of a
warm-up to the end. Targets: total <= 0.8x, first audio <= 0.5x, drift <= 1%.

--version 3 (CosyVoice3, same rows and targets): without --model a published-size folder (~3.7 GB) is
written once to ~/.cache/edge_runtime/bench/cosyvoice3-published by scripts/cosyvoice3_testmodel.py
(our modules, upstream's keys and shapes). The reference is upstream's own code from a checkout
(--upstream, default /work/cosyvoice_upstream; scripts/cosyvoice3_fixtures.py says how to make one),
run by scripts/cosyvoice3_reference_bench.py in the same venv: its LM, flow, HiFT and its
CosyVoice3Model.tts(stream=True). Any id >= 6561 ends CosyVoice3's LM and random weights draw one at
once, so both sides mask all of them until exactly --tokens (ours: end_only_after_min=True). The
prompt text is upstream's "You are a helpful assistant.<|endofprompt|>" + transcript, with id 151646
for <|endofprompt|> (the test folder's small BPE has its own id for it, but upstream asserts 151646;
a test vocabulary too small for 151646 uses the tokenizer's id, on both sides). RSS drift runs only
when --requests is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REF_PY = ROOT / ".cosyvoice_ref" / "bin" / "python"
UPSTREAM = Path("/work/cosyvoice_upstream")
ENDOFPROMPT_ID = 151646  # <|endofprompt|> in the published vocabulary, asserted by upstream's CosyVoice3 LM
TEXT = ("The old lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, and watched "
        "the ships slide past the rocks; in forty years he never missed a night, and the town, in its "
        "quiet way, loved him for it.")
TRANSCRIPT = "This is the voice I would like you to speak with."
PROMPT_TOKENS = 75  # a three-second voice prompt at 25 tokens per second


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def published_folder(version: int = 2) -> Path:
    folder = Path(os.environ.get("EDGE_RUNTIME_CACHE_DIR", Path.home() / ".cache" / "edge_runtime"))
    folder = folder / "bench" / f"cosyvoice{version}-published"
    if not (folder / "spk2info.pt").is_file():
        print(f"writing a published-size random CosyVoice{version} folder to {folder} ...", flush=True)
        if version == 3:  # from our own modules: runs in this venv
            writer = [sys.executable, str(ROOT / "scripts" / "cosyvoice3_testmodel.py")]
        else:
            writer = [str(REF_PY), str(ROOT / "scripts" / "cosyvoice_testmodel.py")]
        subprocess.run([*writer, str(folder), "--size", "published"], check=True)
    return folder


def inputs(folder: Path, seed: int, version: int = 2) -> dict:
    from edge_runtime.models.cosyvoice.tokenizer import CosyVoiceTextTokenizer

    tok = CosyVoiceTextTokenizer(folder / "CosyVoice-BlankEN", version=version)
    g = torch.Generator().manual_seed(seed)
    prompt_text, extra = tok.encode(TRANSCRIPT), {}
    if version == 3:
        from edge_runtime.models.cosyvoice.family import SYSTEM_PROMPT

        vocab = json.loads((folder / "CosyVoice-BlankEN" / "config.json").read_text())["vocab_size"]
        eop = ENDOFPROMPT_ID if vocab > ENDOFPROMPT_ID else tok.endofprompt_id
        prompt_text = tok.encode(SYSTEM_PROMPT) + [eop] + prompt_text
        extra = {"endofprompt_id": eop}
    return {"text_ids": tok.encode(TEXT), "prompt_text_ids": prompt_text,
            "prompt_speech_tokens": torch.randint(0, 6561, (PROMPT_TOKENS,), generator=g).tolist(),
            "embedding": torch.randn(192, generator=g).tolist(),
            "prompt_feat": (torch.randn(2 * PROMPT_TOKENS, 80, generator=g) - 5).tolist()} | extra


def check_upstream(upstream: Path) -> None:
    if not (upstream / "cosyvoice" / "cli" / "model.py").is_file():
        raise SystemExit(f"--upstream {upstream}: no checkout of FunAudioLLM/CosyVoice there (cosyvoice/cli/model.py "
                         "missing); make one with: mkdir -p DIR && git --git-dir=/work/.mirror/FunAudioLLM+CosyVoice/"
                         "repo archive HEAD | tar -x -C DIR (see scripts/cosyvoice3_fixtures.py)")


def run_reference(folder: Path, req: dict, out: Path, version: int = 2, upstream: Path = UPSTREAM) -> dict:
    if not REF_PY.is_file():
        raise SystemExit("the reference venv is missing: bash scripts/cosyvoice_reference.sh")
    cmd = [str(REF_PY), str(ROOT / "scripts" / "cosyvoice_reference_bench.py"), str(folder), str(out)]
    if version == 3:
        check_upstream(upstream)
        cmd = [str(REF_PY), str(ROOT / "scripts" / "cosyvoice3_reference_bench.py"), str(folder), str(out),
               "--upstream", str(upstream)]
    proc = subprocess.run(cmd, input=json.dumps(req), text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"reference bench failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def voice_from(req: dict, model):
    from edge_runtime.prepared_voice import PreparedVoice

    tensors = {"speech_tokens": torch.tensor(req["prompt_speech_tokens"], dtype=torch.int32),
               "prompt_feat": torch.tensor(req["prompt_feat"], dtype=torch.float32),
               "embedding": torch.tensor(req["embedding"], dtype=torch.float32),
               "text_ids": torch.tensor(req["prompt_text_ids"], dtype=torch.int32)}
    return PreparedVoice(tensors=tensors, model_id=model.model_id, sample_rate=16000, transcript=TRANSCRIPT,
                         extra={"mode": "zero_shot"})


def run_ours(folder: Path, req: dict, n: int, threads: int, requests: int, version: int = 2) -> dict:
    import edge_runtime

    rt = edge_runtime.load(str(folder), profile="cpu", overrides=(f"runtime.threads={threads}",
                                                                  "precision.dtype=fp32"))
    model = rt.model
    vocode = model.pipeline.vocode
    # CosyVoice3: no stop id before the minimum, so that random weights run exactly n tokens (the
    # reference masks the same ids); the pipeline's requests call the LM's generate too
    fixed = {"end_only_after_min": True} if version == 3 else {}
    if fixed:
        model.lm.generate = functools.partial(model.lm.generate, **fixed)
        # the marker id both sides use (151646 at the published vocabulary); the test folder's small
        # BPE numbers its own <|endofprompt|> otherwise, and the family takes the LM's from it
        model.lm.cfg = dataclasses.replace(model.lm.cfg, endofprompt_id=req["endofprompt_id"])
    voice = voice_from(req, model)
    text, prompt_text, prompt_speech = req["text_ids"], req["prompt_text_ids"], req["prompt_speech_tokens"]
    res: dict = {"tokens": n}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        toks = list(model.lm.generate(text, prompt_text, prompt_speech, generator=g, min_tokens=n, max_tokens=n))
        res["lm_s"], res["lm_tokens"] = time.perf_counter() - t0, len(toks)
        t0 = time.perf_counter()
        mel = model.flow.inference(toks, prompt_speech, voice.tensors["prompt_feat"], voice.tensors["embedding"],
                                   generator=g, streaming=False)
        res["flow_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav = vocode(model.hift, mel, generator=g)
        res["hift_s"] = time.perf_counter() - t0
        res["audio_s"] = wav.shape[-1] / model.sample_rate
        res["lm_dtype"] = str(next(model.lm.parameters()).dtype).removeprefix("torch.")
    if res["lm_dtype"] != "float32":  # the same LM with fp32 weights, for the same-precision comparison
        from edge_runtime.models.cosyvoice import llm

        fp32_lm = llm.load(folder)
        with torch.inference_mode():
            t0 = time.perf_counter()
            count = sum(1 for _ in fp32_lm.generate(text, prompt_text, prompt_speech, generator=torch.Generator()
                                                    .manual_seed(0), min_tokens=n, max_tokens=n, **fixed))
            res["lm_fp32_s"], res["lm_fp32_tokens"] = time.perf_counter() - t0, count
        del fp32_lm
    def first_audio() -> tuple[float, float, int]:
        request = model.pipeline.request(text, prompt_text, prompt_speech, voice, torch.Generator().manual_seed(1),
                                         max_tokens=n, min_tokens=n)
        t0, first, samples = time.perf_counter(), None, 0
        for chunk in request.stream():
            first = first or time.perf_counter() - t0
            samples += len(chunk)
        request.close()
        return first, time.perf_counter() - t0, samples

    # cold: the voice's first request computes the flow on its prompt; prepared (what prepare_voice
    # does): that work was done when the voice was prepared, as for every later request
    model.pipeline.prompt_state = None
    first_cold, _, _ = first_audio()
    model.warm_voice(voice)
    first, total, samples = first_audio()
    res |= {"stream_first_s": first, "stream_first_cold_s": first_cold, "stream_total_s": total,
            "stream_audio_s": samples / model.sample_rate}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ours:", json.dumps(res), flush=True)
    if requests:
        res |= drift(rt, requests)
    rt.close()
    return res


def drift(rt, requests: int, cap: int = 8) -> dict:
    """RSS over `requests` short streamed requests through the runtime (engine, per-request cleanup,
    LM cache, flow and vocoder streams): each capped at `cap` speech tokens (random weights never
    stop) and without a voice prompt, so that 100 requests at the published size take minutes."""
    rt.model.pipeline.token_cap = cap
    warm = max(5, requests // 10)
    samples = []
    for i in range(requests + warm):
        for _ in rt.stream("Hello there.", seed=i):
            pass
        samples.append(rss_mib())
    rt.model.pipeline.token_cap = None
    base, last = samples[warm - 1], samples[-1]
    return {"drift_requests": requests, "drift_tokens": cap, "rss_after_warmup_mib": base, "rss_end_mib": last,
            "rss_max_mib": max(samples[warm:]), "rss_drift_pct": 100 * (last - base) / base}


def table(ref: dict, ours: dict) -> list[tuple[str, float, float, float]]:
    def per_token(r):
        return 1000 * r["lm_s"] / r["lm_tokens"]

    def per_audio(r, key):
        return r[key] / r["audio_s"]

    def total(r):
        return r["lm_s"] + r["flow_s"] + r["hift_s"]

    rows = [(f"LM ms/token ({ours['lm_dtype']} weights)", per_token(ref), per_token(ours)),
            ("flow s per s of audio", per_audio(ref, "flow_s"), per_audio(ours, "flow_s")),
            ("HiFT s per s of audio", per_audio(ref, "hift_s"), per_audio(ours, "hift_s")),
            ("total s (LM+flow+HiFT)", total(ref), total(ours)),
            *([("  LM ms/token, fp32 weights", per_token(ref), 1000 * ours["lm_fp32_s"] / ours["lm_fp32_tokens"]),
               ("  total, all fp32", total(ref), ours["lm_fp32_s"] + ours["flow_s"] + ours["hift_s"])]
              if "lm_fp32_s" in ours else []),
            ("first audio s (streamed)", ref["stream_first_s"], ours["stream_first_s"]),
            ("  ours on a voice's 1st use", ref["stream_first_s"], ours["stream_first_cold_s"]),
            ("streamed request s", ref["stream_total_s"], ours["stream_total_s"]),
            ("peak RSS MiB", ref["peak_rss_mib"], ours["peak_rss_mib"])]
    return [(name, a, b, b / a) for name, a, b in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", type=int, choices=(2, 3), default=2, help="CosyVoice2 or CosyVoice3 (default 2)")
    p.add_argument("--model", type=Path, help="CosyVoice2/3 folder (default: a published-size random one)")
    p.add_argument("--upstream", type=Path, default=UPSTREAM,
                   help=f"--version 3: checkout of FunAudioLLM/CosyVoice, the reference (default {UPSTREAM})")
    p.add_argument("--tokens", type=int, default=100, help="speech tokens per request (default 100 = 4 s)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests for the RSS drift (0: skip; default 100 for version 2, 0 for version 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None,
                   help="default bench_cosyvoice.json (version 2), bench_cosyvoice3.json (version 3)")
    a = p.parse_args()
    v3 = a.version == 3
    requests = a.requests if a.requests is not None else (0 if v3 else 100)
    out = a.out or Path("bench_cosyvoice3.json" if v3 else "bench_cosyvoice.json")
    if v3:
        check_upstream(a.upstream)  # before writing a 3.7 GB folder
    folder = a.model or published_folder(a.version)
    torch.set_num_threads(a.threads)
    req = inputs(folder, seed=0, version=a.version) | {"tokens": a.tokens, "threads": a.threads, "seed": 0}
    print(f"model {folder}; text {len(TEXT)} characters = {len(req['text_ids'])} tokens; "
          f"{a.tokens} speech tokens; prompt {PROMPT_TOKENS} tokens; {a.threads} threads", flush=True)
    if v3:
        print(f"CosyVoice3; reference: upstream at {a.upstream}; <|endofprompt|> id {req['endofprompt_id']}",
              flush=True)
    ref = run_reference(folder, req, out.with_suffix(".reference.json"), a.version, a.upstream)
    print("reference:", json.dumps(ref), flush=True)
    ours = run_ours(folder, req, a.tokens, a.threads, requests, a.version)
    rows = table(ref, ours)
    print(f"\n{'':34}{'reference':>12}{'ours':>12}{'ours/ref':>10}")
    for name, r, o, ratio in rows:
        print(f"{name:34}{r:12.3f}{o:12.3f}{ratio:10.2f}")
    ratios = {name: ratio for name, _, _, ratio in rows}
    checks = {"total <= 0.8x": ratios["total s (LM+flow+HiFT)"] <= 0.8,
              "first audio <= 0.5x": ratios["first audio s (streamed)"] <= 0.5}
    if "rss_drift_pct" in ours:
        print(f"RSS over {ours['drift_requests']} requests: {ours['rss_after_warmup_mib']:.1f} MiB after warm-up, "
              f"{ours['rss_end_mib']:.1f} MiB at the end (max {ours['rss_max_mib']:.1f}): "
              f"drift {ours['rss_drift_pct']:+.2f}%")
        checks["RSS drift <= 1%"] = abs(ours["rss_drift_pct"]) <= 1.0
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    out.write_text(json.dumps({"reference": ref, "ours": ours, "rows": rows, "checks": checks,
                               "text_chars": len(TEXT), "tokens": a.tokens, "threads": a.threads}
                              | ({"version": 3} if v3 else {}), indent=2))
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
