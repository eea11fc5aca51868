"""The CosyVoice3 parity fixtures (tests/fixtures/cosyvoice3/) are complete and consistent.

They are written by scripts/cosyvoice3_fixtures.py from upstream's own code; the model tests
compare against them. Upstream is not needed here: these checks only read the files, so a
regenerated set that lost a file, a key, a case or a shape fails here first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_runtime.models.cosyvoice import yaml_config

FIXTURES = Path(__file__).parent / "fixtures" / "cosyvoice3"
SPEECH_TOKENS = 6561
SAMPLES_PER_FRAME = 480
FILES = ["cosyvoice3.yaml", "CosyVoice-BlankEN/config.json", "llm.safetensors", "flow.safetensors",
         "hift.safetensors", "lm_case.safetensors", "flow_case.safetensors", "hift_case.safetensors",
         "e2e_case.safetensors", "cases.json", "manifest.json"]


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def conf() -> dict:
    return yaml_config.load(FIXTURES / "cosyvoice3.yaml")


def weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def family(key: str) -> str:
    """A key with its layer indices replaced, so tiny and published layouts compare."""
    return re.sub(r"\.\d+\.", ".N.", key)


def test_every_file_present_and_small():
    missing = [f for f in FILES if not (FIXTURES / f).is_file()]
    assert not missing, f"regenerate with scripts/cosyvoice3_fixtures.py; missing: {missing}"
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 8.5e6, f"fixtures grew to {total} bytes"


def test_cases_json_fields(cases):
    assert re.fullmatch(r"[0-9a-f]{40}", cases["upstream"]["commit"])
    for section, fields in {
        "lm": ["seed", "min_len", "max_len", "text_ids", "prompt_text_ids", "prompt_speech_tokens",
               "endofprompt_id", "early_stop", "silence"],
        "flow": ["inputs_seed", "noise_seed", "prompt_tokens", "tokens", "stream_hops"],
        "hift": ["seed", "source_seed", "source_samples", "frames", "stream_frames", "stream"],
        "e2e": ["inputs_seed", "noise_seed", "hift_seed", "prompt_tokens", "tokens", "stream_hops"],
    }.items():
        assert set(fields) <= set(cases[section]), (section, set(fields) - set(cases[section]))
    assert cases["notes"] and all(isinstance(n, str) for n in cases["notes"])


@pytest.mark.parametrize("name", ["llm", "flow", "hift"])
def test_state_dict_layout_matches_published(name, manifest):
    tiny = weights(name)
    published = manifest[f"{name}.pt"]
    assert sorted({family(k) for k in tiny}) == sorted({family(k) for k in published})
    ndim = {family(k): len(shape) for k, shape in published.items()}
    for key, t in tiny.items():
        assert t.dtype == torch.float32 and t.is_contiguous(), key
        assert t.dim() == ndim[family(key)], key


def test_published_manifest_numbers(manifest):
    llm, flow, hift = manifest["llm.pt"], manifest["flow.pt"], manifest["hift.pt"]
    assert llm["speech_embedding.weight"] == [SPEECH_TOKENS + 200, 896]
    assert llm["llm_decoder.weight"] == [SPEECH_TOKENS + 200, 896] and "llm_decoder.bias" not in llm
    assert llm["llm.model.model.embed_tokens.weight"] == [151936, 896]
    assert llm["llm.model.lm_head.weight"] == [151936, 896]
    assert len({k.split(".")[4] for k in llm if k.startswith("llm.model.model.layers.")}) == 24
    assert flow["input_embedding.weight"] == [SPEECH_TOKENS, 80]
    assert flow["pre_lookahead_layer.conv1.weight"] == [1024, 80, 4]
    assert len({k.split(".")[3] for k in flow if k.startswith("decoder.estimator.transformer_blocks.")}) == 22
    assert hift["conv_pre.parametrizations.weight.original1"] == [512, 80, 5]


def test_tiny_shapes_follow_the_yaml(conf):
    qwen = json.loads((FIXTURES / "CosyVoice-BlankEN" / "config.json").read_text())
    llm, flow, hift = weights("llm"), weights("flow"), weights("hift")
    size = conf["llm_input_size"]
    assert qwen["hidden_size"] == size and qwen["tie_word_embeddings"] is True
    assert list(llm["speech_embedding.weight"].shape) == [SPEECH_TOKENS + 200, size]
    assert list(llm["llm_decoder.weight"].shape) == [SPEECH_TOKENS + 200, size]
    assert list(llm["llm.model.model.embed_tokens.weight"].shape) == [qwen["vocab_size"], size]
    head_dim = size // qwen["num_attention_heads"]
    k_proj = llm["llm.model.model.layers.0.self_attn.k_proj.weight"]
    assert list(k_proj.shape) == [qwen["num_key_value_heads"] * head_dim, size]
    est = conf["flow"]["decoder"]["estimator"]
    assert est["heads"] * est["dim_head"] == est["dim"]
    assert list(flow["input_embedding.weight"].shape) == [SPEECH_TOKENS, 80]
    assert list(flow["decoder.estimator.transformer_blocks.0.attn.to_q.weight"].shape) == [est["dim"], est["dim"]]
    assert list(flow["decoder.estimator.rotary_embed.inv_freq"].shape) == [est["dim_head"] // 2]
    blocks = {k.split(".")[3] for k in flow if k.startswith("decoder.estimator.transformer_blocks.")}
    assert len(blocks) == est["depth"]
    assert hift["conv_pre.parametrizations.weight.original1"].shape[0] == conf["hift"]["base_channels"]


def test_lm_case(cases):
    lm, t = cases["lm"], weights("lm_case")
    for key in ("text_ids", "prompt_text_ids", "prompt_speech_tokens"):
        assert t[key].dtype == torch.int64 and t[key].tolist() == lm[key]
    assert lm["endofprompt_id"] in lm["prompt_text_ids"] + lm["text_ids"]
    length = 1 + len(lm["prompt_text_ids"]) + len(lm["text_ids"]) + 1 + len(lm["prompt_speech_tokens"])
    assert list(t["logits"].shape) == [length, SPEECH_TOKENS + 200] and torch.isfinite(t["logits"]).all()
    tokens = t["sampled_tokens"].tolist()
    assert len(tokens) == lm["sampled"] and min_len_rule(lm, tokens)
    assert all(0 <= x < SPEECH_TOKENS for x in tokens)
    early = t["sampled_tokens_early_stop"].tolist()
    assert len(early) == lm["early_stop"]["sampled"] < lm["min_len"]  # a stop id before min_len


def min_len_rule(lm: dict, tokens: list) -> bool:
    """Either max_len was reached or a stop id (>= 6561) ended decoding."""
    if lm["stopped_by"] == "max_len":
        return len(tokens) == lm["max_len"]
    return lm["stopped_by"] >= SPEECH_TOKENS and len(tokens) < lm["max_len"]


def test_lm_silence_case_applies_the_cap(cases):
    s, t = cases["lm"]["silence"], weights("lm_case")
    raw, capped = t["sampled_tokens_silence_raw"].tolist(), t["sampled_tokens_silence"].tolist()
    kept, run = [], 0
    for x in raw:  # CosyVoice3Model.llm_job: more than 5 silent tokens in a row are dropped
        run = run + 1 if x in s["silent_tokens"] else 0
        if run <= s["max_silent_token_num"]:
            kept.append(x)
    assert capped == kept and len(capped) < len(raw) == s["raw_len"]


def check_stream(hops: list, total_tokens: int, prompt_tokens: int) -> None:
    """CosyVoice3Model's schedule: hop 25 (+ prompt padding to a multiple of 25) doubling to 100,
    3 lookahead tokens, the last chunk finalize=True over all tokens."""
    hop, offset = 25, 0
    pad = -prompt_tokens % 25
    for h in hops[:-1]:
        this = hop + pad if offset == 0 else hop
        assert h["token_offset"] == offset and h["tokens"] == [0, offset + this + 3]
        assert h["streaming"] and not h["finalize"] and not h["hift_finalize"]
        assert h["new_mel_frames"] == [2 * offset, 2 * (offset + this)]
        offset += this
        hop = min(100, hop * 2)
    last = hops[-1]
    assert last["finalize"] and last["hift_finalize"] and not last["streaming"]
    assert last["tokens"] == [0, total_tokens] and last["new_mel_frames"] == [2 * offset, 2 * total_tokens]
    samples = [h["samples"] for h in hops]
    assert samples[0][0] == 0 and all(a[1] == b[0] for a, b in zip(samples, samples[1:]))
    assert samples[-1][1] == 2 * total_tokens * SAMPLES_PER_FRAME


def test_flow_case(cases):
    f, t = cases["flow"], weights("flow_case")
    n, p = f["tokens"], f["prompt_tokens"]
    assert t["tokens"].dtype == t["prompt_tokens"].dtype == torch.int64
    assert list(t["tokens"].shape) == [n] and list(t["prompt_tokens"].shape) == [p]
    assert list(t["prompt_feat"].shape) == [1, 2 * p, 80] and list(t["embedding"].shape) == [1, 192]
    assert list(t["noise"].shape) == [1, 80, 2 * (p + n)] and list(t["mel"].shape) == [1, 80, 2 * n]
    hops = f["stream_hops"]
    assert len(hops) >= 3
    check_stream(hops, n, p)
    for i, h in enumerate(hops):
        assert list(t[f"chunk_{i}"].shape) == [1, 80, h["new_mel_frames"][1] - h["new_mel_frames"][0]]
    assert f"chunk_{len(hops)}" not in t


def test_hift_case(cases):
    h, t = cases["hift"], weights("hift_case")
    assert list(t["mel"].shape) == [1, 80, h["frames"]]
    assert list(t["wav"].shape) == [1, h["frames"] * SAMPLES_PER_FRAME]
    assert 0 < h["voiced_fraction"] < 1  # both source branches are exercised
    assert [c["mel_frames"][1] for c in h["stream"]] == h["stream_frames"]
    assert [c["finalize"] for c in h["stream"]] == [False] * (len(h["stream"]) - 1) + [True]
    for i, c in enumerate(h["stream"]):
        assert list(t[f"stream_chunk_{i}"].shape) == [1, c["samples"][1] - c["samples"][0]]
    assert h["stream"][-1]["samples"][1] == t["wav"].shape[1]
    assert list(t["source_rand_ini"].shape) == [1, 9] and float(t["source_rand_ini"][0, 0]) == 0.0
    assert t["source_sine_waves_head"].shape[2] == 9 and t["source_uv_head"].shape[2] == 1


def test_source_recipe_reproduces_the_saved_head(cases):
    """cases.json's generator recipe for the NSF source buffers gives the saved values."""
    h, t = cases["hift"], weights("hift_case")
    n = t["source_sine_waves_head"].shape[1]

    def rand(*shape, k):
        return torch.rand(*shape, generator=torch.Generator().manual_seed(h["source_seed"] + k))

    ini = rand(1, 9, k=0)
    ini[:, 0] = 0
    assert torch.equal(ini, t["source_rand_ini"])
    assert torch.equal(rand(1, n, 9, k=1), t["source_sine_waves_head"])
    assert torch.equal(rand(1, n, 1, k=2), t["source_uv_head"])


def test_e2e_case(cases):
    e, t = cases["e2e"], weights("e2e_case")
    n, p = e["tokens"], e["prompt_tokens"]
    assert list(t["mel"].shape) == [1, 80, 2 * n] and list(t["wav"].shape) == [1, 2 * n * SAMPLES_PER_FRAME]
    assert list(t["noise"].shape) == [1, 80, 2 * (p + n)]
    check_stream(e["stream_hops"], n, p)
    for i, h in enumerate(e["stream_hops"]):
        assert list(t[f"stream_mel_{i}"].shape) == [1, 80, h["new_mel_frames"][1] - h["new_mel_frames"][0]]
        assert list(t[f"stream_wav_{i}"].shape) == [1, h["samples"][1] - h["samples"][0]]
    assert float(t["wav"].abs().max()) <= 0.99  # upstream's audio_limit clamp
