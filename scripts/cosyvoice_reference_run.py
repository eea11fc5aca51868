"""Compute CosyVoice2 reference outputs with the reference package's own modules.

Run with the reference venv's python (built by scripts/cosyvoice_reference.sh):

    .cosyvoice_ref/bin/python scripts/cosyvoice_reference_run.py MODEL_DIR OUT.npz < request.json
    .cosyvoice_ref/bin/python scripts/cosyvoice_reference_run.py MODEL_DIR OUT.npz --request req.json

MODEL_DIR is a CosyVoice2 folder in the official layout (see scripts/cosyvoice_testmodel.py).
The request is a JSON object; every field is optional:

    stages               list of "lm_logits", "lm_sample", "flow", "hift", "stream"
                         (default: all but "stream")
    text_ids             target text token ids                      (default [11, 12, 13, 14, 15])
    prompt_text_ids      prompt text token ids                      (default [])
    prompt_speech_tokens prompt speech tokens, 0..6560              (default [])
    speech_tokens        tokens for "flow"/"stream"                 (default: seeded random, 30)
    embedding            192 floats (speaker embedding)             (default: seeded randn)
    prompt_feat          [frames][80] prompt mel, frames = 2 * len(prompt_speech_tokens)
                         (default: seeded randn of that size)
    mel                  [80][frames] input mel for "hift"          (default: the "flow" mel, else
                                                                     seeded randn of 2 * 30 frames)
    seed                 int, torch seed set before every stage     (default 0)
    threads              torch CPU threads                          (default min(4, cpu count))
    hift_phase           [B][9] initial harmonic phases (cycles) for "hift": replaces the
                         source's torch.rand draw                    (default: drawn under seed)
    hift_noise           [B][S][9] standard-normal source noise for "hift", S = frames*480:
                         replaces the source's randn_like draw       (default: drawn under seed)
    noise_seed           int: flow noise = randn(1, 80, 15000) from a Generator with this seed;
                         absent/null: upstream's own noise (drawn after seed(0) at construction)
    min_token_text_ratio, max_token_text_ratio   for "lm_sample"   (default 2, 20)
    flow_streaming, flow_finalize  the "flow" stage's streaming / finalize arguments
                                                                     (default false, true)
    stream_hop_scale, stream_max_hop  "stream": after each chunk hop = min(max, hop * scale), as
                         upstream's later CosyVoice2Model grows it  (default 1, 100: the fixed
                                                                     hop 25 of this package)
    stream_final_streaming  "stream": the last chunk with streaming=True instead of upstream's
                         streaming=False (full attention)           (default false)
    inputs_npz           path of an .npz whose arrays override the JSON fields of the same name
                         (embedding [1,192], prompt_feat [1,F,80], mel [1,80,F], noise [1,80,N],
                         hift_phase [1,9], hift_noise [1,S,9])

Written to OUT.npz (float32 / int64), only for the stages run:
    lm_input_embeds [1,L,D], lm_logits [1,L,V+3]  V = speech_token_size (logits of every position
                                                  of [sos, prompt_text+text, task_id, prompt_speech])
    lm_tokens [N]                                 Qwen2LM.inference (ras_sampling) under torch seed
    flow_mel [1,80,2*T]                           flow.inference (default streaming=False, finalize=True)
    flow_seconds [1]                              wall time of that call
    hift_wav [1,S], hift_source [1,1,S]           hift.inference under torch seed, S = frames*480
    stream_wav_K [1,*], stream_mel_K [1,80,*]     chunks of upstream's token2wav streaming loop
    stream_wav [1,*]                              the chunks concatenated
    stream_token_offset [K]                       token_offset of each chunk (its mel from 2x that)
    stream_flow_seconds [K]                       wall time of each chunk's flow.inference
    in_*                                          the inputs actually used (for the parity side)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

import numpy as np
import torch

SECTIONS = ("llm", "flow", "hift")  # the yaml keys built here; the rest needs whisper/librosa


def trimmed_yaml(text: str) -> str:
    """Keep the scalar 'fixed params' and the llm/flow/hift blocks of an upstream yaml.

    Upstream's yaml also names the tokenizer, feature extractor and training pipeline,
    whose modules import whisper/librosa/pyarrow; loading them is not needed here.
    """
    out, keep = [], False
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_][\w]*):(.*)$", line)
        if top:
            key, rest = top.group(1), top.group(2).strip()
            scalar = rest and not rest.startswith("!") and not rest.startswith("[")
            keep = key in SECTIONS or (scalar and not key.startswith("__"))
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def fit_tiny_encoder(flow: torch.nn.Module) -> None:
    """The reference's UpsampleConformerEncoder hard-codes 512 channels for its pre-lookahead
    and upsample layers; a tiny yaml (output_size != 512) gets those two rebuilt with the
    same reference classes at the yaml's width, as upstream's later code does."""
    from cosyvoice.transformer.upsample_encoder import PreLookaheadLayer, Upsample1D

    enc = flow.encoder
    width = enc.output_size()
    if enc.pre_lookahead_layer.channels != width:
        enc.pre_lookahead_layer = PreLookaheadLayer(channels=width, pre_lookahead_len=flow.pre_lookahead_len)
    if enc.up_layer.channels != width:
        enc.up_layer = Upsample1D(channels=width, out_channels=width, stride=enc.up_layer.stride)


def build_modules(model_dir: str) -> dict:
    """Build llm/flow/hift from MODEL_DIR/cosyvoice2.yaml exactly as upstream does
    (hyperpyyaml, qwen_pretrain_path overridden to CosyVoice-BlankEN), random-initialised."""
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(model_dir, "cosyvoice2.yaml")) as f:
        text = trimmed_yaml(f.read())
    cfg = load_hyperpyyaml(text, overrides={"qwen_pretrain_path": os.path.join(model_dir, "CosyVoice-BlankEN")})
    fit_tiny_encoder(cfg["flow"])
    # transformers 5 keeps the saved dtype in from_pretrained (bf16 for the published BlankEN),
    # transformers 4 gave fp32; the reference runs in fp32 as upstream did.
    return {k: cfg[k].float() for k in SECTIONS} | {"sample_rate": cfg.get("sample_rate", 24000)}


def load_model(model_dir: str) -> dict:
    """build_modules + the folder's llm.pt/flow.pt/hift.pt, loaded as upstream does (strict)."""
    m = build_modules(model_dir)
    for name in SECTIONS:
        sd = torch.load(os.path.join(model_dir, f"{name}.pt"), map_location="cpu", weights_only=True)
        m[name].load_state_dict(sd, strict=True)
        m[name].eval()
    return m


@contextlib.contextmanager
def injected_source_randomness(hift, phase, noise):
    """Make the NSF sine generator (SineGen2) of `hift` use the given initial phases and noise
    instead of its torch.rand / torch.randn_like draws; its own code runs unchanged otherwise.
    Either may be None (that draw stays random)."""
    sine_gen = hift.m_source.l_sin_gen
    real_forward = sine_gen.forward

    def forward(f0):
        real_rand, real_randn_like = torch.rand, torch.randn_like

        def rand(*size, **kw):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            assert tuple(phase.shape) == tuple(shape), (tuple(phase.shape), shape)
            return phase.clone()

        def randn_like(t, **kw):
            assert tuple(noise.shape) == tuple(t.shape), (tuple(noise.shape), tuple(t.shape))
            return noise.clone().to(t.dtype)

        if phase is not None:
            torch.rand = rand
        if noise is not None:
            torch.randn_like = randn_like
        try:
            return real_forward(f0)
        finally:
            torch.rand, torch.randn_like = real_rand, real_randn_like

    sine_gen.forward = forward
    try:
        yield
    finally:
        del sine_gen.forward


def _arr(req: dict, key: str, default):
    v = req.get(key)
    return default if v is None else torch.as_tensor(np.asarray(v, dtype=np.float32))


def run(model_dir: str, req: dict) -> dict[str, np.ndarray]:
    if req.get("inputs_npz"):
        with np.load(req["inputs_npz"]) as z:
            req = req | {k: z[k] for k in z.files}
    torch.set_num_threads(int(req.get("threads") or max(1, min(4, os.cpu_count() or 1))))
    m = load_model(model_dir)
    llm, flow, hift = m["llm"], m["flow"], m["hift"]
    stages = req.get("stages") or ["lm_logits", "lm_sample", "flow", "hift"]
    seed = int(req.get("seed", 0))
    gen = torch.Generator().manual_seed(seed)  # inputs not given are drawn from this

    def ids(key, default):  # any int list/array -> [1, N] int32, as upstream's frontend makes them
        v = req.get(key)
        return torch.tensor(np.asarray(default if v is None else v, dtype=np.int64).reshape(1, -1), dtype=torch.int32)

    text = ids("text_ids", [11, 12, 13, 14, 15])
    prompt_text = ids("prompt_text_ids", [])
    prompt_tok = ids("prompt_speech_tokens", [])
    tokens = ids("speech_tokens", torch.randint(0, 6561, (30,), generator=gen).tolist())
    emb = _arr(req, "embedding", torch.randn(1, 192, generator=gen)).reshape(1, 192)
    ratio = flow.token_mel_ratio
    prompt_feat = _arr(req, "prompt_feat", torch.randn(1, ratio * prompt_tok.shape[1], 80, generator=gen))
    prompt_feat = prompt_feat.reshape(1, -1, 80)
    out = {"in_text_ids": text.numpy(), "in_prompt_text_ids": prompt_text.numpy(),
           "in_prompt_speech_tokens": prompt_tok.numpy(), "in_speech_tokens": tokens.numpy(),
           "in_embedding": emb.numpy(), "in_prompt_feat": prompt_feat.numpy()}

    # Flow noise: upstream uses a fixed buffer drawn at construction after seed(0).
    if req.get("noise") is not None:
        flow.decoder.rand_noise = _arr(req, "noise", None).reshape(1, 80, -1)
    elif req.get("noise_seed") is not None:
        g = torch.Generator().manual_seed(int(req["noise_seed"]))
        flow.decoder.rand_noise = torch.randn(1, 80, 50 * 300, generator=g)

    with torch.inference_mode():
        if "lm_logits" in stages:
            # Same input layout as Qwen2LM.inference: [sos, prompt_text + text, task_id, prompt_speech].
            all_text = torch.cat([prompt_text, text], dim=1)
            parts = [llm.llm_embedding.weight[llm.sos_eos].reshape(1, 1, -1),
                     llm.llm.model.model.embed_tokens(all_text),
                     llm.llm_embedding.weight[llm.task_id].reshape(1, 1, -1),
                     llm.speech_embedding(prompt_tok)]
            x = torch.cat(parts, dim=1)
            h, _ = llm.llm(x, torch.tensor([x.shape[1]], dtype=torch.int32))
            out["lm_input_embeds"] = x.numpy()
            out["lm_logits"] = llm.llm_decoder(h).numpy()

        if "lm_sample" in stages:
            torch.manual_seed(seed)
            toks = list(llm.inference(
                text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
                prompt_text=prompt_text, prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32),
                prompt_speech_token=prompt_tok,
                prompt_speech_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
                embedding=torch.zeros(1, 0), sampling=25,
                max_token_text_ratio=float(req.get("max_token_text_ratio", 20)),
                min_token_text_ratio=float(req.get("min_token_text_ratio", 2))))
            out["lm_tokens"] = np.asarray(toks, dtype=np.int64)

        if "flow" in stages:
            torch.manual_seed(seed)
            start = time.perf_counter()
            mel, _ = flow.inference(
                token=tokens, token_len=torch.tensor([tokens.shape[1]], dtype=torch.int32),
                prompt_token=prompt_tok, prompt_token_len=torch.tensor([prompt_tok.shape[1]], dtype=torch.int32),
                prompt_feat=prompt_feat, prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32),
                embedding=emb, streaming=bool(req.get("flow_streaming", False)),
                finalize=bool(req.get("flow_finalize", True)))
            out["flow_seconds"] = np.array([time.perf_counter() - start])
            out["flow_mel"] = mel.numpy()

        if "hift" in stages:
            if req.get("mel") is not None:
                mel_in = _arr(req, "mel", None).reshape(1, 80, -1)
            elif "flow_mel" in out:
                mel_in = torch.from_numpy(out["flow_mel"])
            else:
                mel_in = torch.randn(1, 80, 2 * 30, generator=gen)
            torch.manual_seed(seed)  # the NSF source draws phases and noise from the global RNG
            phase = _arr(req, "hift_phase", None)
            noise = _arr(req, "hift_noise", None)
            with injected_source_randomness(hift, phase, noise):
                wav, source = hift.inference(speech_feat=mel_in)
            out |= {"in_mel": mel_in.numpy(), "hift_wav": wav.numpy(), "hift_source": source.numpy()}
            out |= {f"in_hift_{k}": v.numpy() for k, v in (("phase", phase), ("noise", noise)) if v is not None}

    if "stream" in stages:
        out |= stream(flow, hift, tokens, prompt_tok, prompt_feat, emb, seed,
                      hop_scale=int(req.get("stream_hop_scale", 1)), max_hop=int(req.get("stream_max_hop", 100)),
                      final_streaming=bool(req.get("stream_final_streaming", False)))
    return out


def stream(flow, hift, tokens, prompt_tok, prompt_feat, emb, seed, hop_scale: int = 1, max_hop: int = 100,
           final_streaming: bool = False) -> dict[str, np.ndarray]:
    """Upstream's streaming schedule (CosyVoice2Model.tts, stream=True) over a fixed token list:
    hop 25 tokens (+ padding of the prompt to a multiple of 25 on the first chunk) + 3 lookahead,
    each chunk re-running the flow over all tokens so far and vocoding with the 8-frame mel /
    source cache and Hamming cross-fade of CosyVoice2Model.token2wav (the reference's own code).
    hop_scale > 1 grows the hop after each chunk up to max_hop (upstream's later code: x2 up to 100);
    final_streaming runs the last chunk chunk-causal instead of with full attention."""
    from cosyvoice.cli.model import CosyVoice2Model

    model = CosyVoice2Model(llm=None, flow=flow, hift=hift, fp16=False)
    mels, seconds = [], []
    real_inference = flow.inference

    def recording_inference(*a, **k):  # keep each chunk's flow mel (and time) for the parity side
        if final_streaming and k.get("finalize"):
            k["streaming"] = True
        start = time.perf_counter()
        mel, cache = real_inference(*a, **k)
        seconds.append(time.perf_counter() - start)
        mels.append(mel.numpy())
        return mel, cache

    flow.inference = recording_inference
    uid = "ref"
    model.hift_cache_dict[uid] = None
    hop, look = model.token_hop_len, flow.pre_lookahead_len
    pad = int(np.ceil(prompt_tok.shape[1] / hop) * hop - prompt_tok.shape[1])
    all_tok = tokens[0].tolist()
    wavs, offset, offsets = [], 0, []
    torch.manual_seed(seed)
    while True:
        this_hop = hop + pad if offset == 0 else hop
        if len(all_tok) - offset < this_hop + look:
            break
        chunk = torch.tensor([all_tok[:offset + this_hop + look]])
        offsets.append(offset)
        wavs.append(model.token2wav(token=chunk, prompt_token=prompt_tok, prompt_feat=prompt_feat,
                                    embedding=emb, token_offset=offset, uuid=uid, stream=True, finalize=False))
        offset += this_hop
        hop = min(max_hop, hop * hop_scale)
    offsets.append(offset)
    wavs.append(model.token2wav(token=torch.tensor([all_tok]), prompt_token=prompt_tok, prompt_feat=prompt_feat,
                                embedding=emb, token_offset=offset, uuid=uid, finalize=True))
    flow.inference = real_inference
    res = {f"stream_wav_{i}": w.numpy() for i, w in enumerate(wavs)}
    res |= {f"stream_mel_{i}": mm for i, mm in enumerate(mels)}
    res["stream_wav"] = torch.cat(wavs, dim=1).numpy()
    res["stream_token_offset"] = np.asarray(offsets, dtype=np.int64)
    res["stream_flow_seconds"] = np.asarray(seconds)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("out_npz")
    p.add_argument("--request", help="JSON file (default: read JSON from stdin; empty stdin = defaults)")
    a = p.parse_args(argv)
    if a.request:
        with open(a.request) as f:
            req = json.load(f)
    else:
        raw = "" if sys.stdin.isatty() else sys.stdin.read()
        req = json.loads(raw) if raw.strip() else {}
    out = run(a.model_dir, req)
    np.savez(a.out_npz, **{k: np.asarray(v) for k, v in out.items()})
    print(json.dumps({k: list(np.shape(v)) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
