"""Planner: sizing on meta, budget, cost model and placement. No GPU, no real big weights."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import check_device_map
from torch import nn

from transformers import (CsmConfig, CsmForConditionalGeneration, DiaConfig,
                          DiaForConditionalGeneration, LlamaConfig, LlamaForCausalLM)

from edge_runtime.policy.planner import (CostModel, PlanError, block_cost, build_on_meta, compute_budget,
                                  describe_model, layout_from_config, plan)
from edge_runtime.policy.planner.layout import GIB
from edge_runtime.policy.profiles import ProfileError, load_profile

TIERS = (2, 4, 6, 8, 12, 24)


def profile(vram_gib=8, reserve_gib=0.8, max_batch=1, chars=500, prompt_s=10, **offload):
    """A real profile: the 8gb file with these values set as `--set` would (the schema checks them)."""
    off = {**dict(backend="auto", target="cpu", pin_memory=True, prefetch=1, keep_resident=[],
                  offload_dir=None), **offload}
    values = {"memory.vram_gib": vram_gib, "memory.reserve_gib": reserve_gib, "batching.max_batch": max_batch,
              "limits.max_text_chars": chars, "limits.max_prompt_seconds": prompt_s,
              **{f"offload.{key}": value for key, value in off.items()}}
    return _load(tuple(f"{key}={json.dumps(value)}" for key, value in values.items()))  # JSON is YAML


@functools.lru_cache(maxsize=None)
def _load(overrides: tuple[str, ...]):
    return load_profile("8gb", overrides)


def llama_1b_config(**kw):
    # TinyLlama-shaped: 22 layers, hidden 2048, GQA 32/4 -> ~1.1B params, ~2 GiB in fp16
    return LlamaConfig(**{**dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                 max_position_embeddings=2048), **kw})


def tiny_llama_config(**kw):
    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                 max_position_embeddings=128), **kw})


@pytest.fixture(scope="module")
def llama_1b():
    return layout_from_config(llama_1b_config(), LlamaForCausalLM, dtype=torch.float16)


@pytest.fixture(scope="module")
def csm():
    from edge_runtime.models.hf.csm import CsmSpeechModel

    return CsmSpeechModel.model_layout(CsmConfig(), torch.bfloat16)


@pytest.fixture(scope="module")
def dia():
    from edge_runtime.models.hf.dia import DiaSpeechModel

    return DiaSpeechModel.model_layout(DiaConfig(), torch.bfloat16)


def real_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def llama_components(model):
    return {"layers": model.model.layers, "embed": model.model.embed_tokens,
            "head": [model.model.norm, model.lm_head]}


# --- sizing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_sizes_equal_real_bytes(dtype, tied):
    torch.manual_seed(0)
    cfg = tiny_llama_config(tie_word_embeddings=tied)
    real = LlamaForCausalLM(cfg).to(dtype)  # real weights, a few hundred KB
    meta = build_on_meta(cfg, LlamaForCausalLM)  # fp32 on meta, sized as dtype
    assert all(p.is_meta for p in meta.parameters())
    real_layout = describe_model(real, llama_components(real), {"layers", "embed", "head"}, dtype)
    meta_layout = describe_model(meta, llama_components(meta), {"layers", "embed", "head"}, dtype)
    assert meta_layout.total_bytes == real_bytes(real) == real_layout.total_bytes
    assert [b.bytes for b in meta_layout.blocks] == [b.bytes for b in real_layout.blocks]
    assert meta_layout.total_params == sum(p.numel() for p in real.parameters())
    layers = meta_layout.component("layers")
    assert len(layers.blocks) == cfg.num_hidden_layers and layers.autoregressive
    assert meta_layout.component("embed").blocks[0].name == "model.embed_tokens"
    if tied:
        head = meta_layout.component("head").blocks[1]
        assert head.name == "lm_head" and head.bytes == 0
        assert head.tied_with == ("model.embed_tokens",)


def test_init_empty_weights_and_fp32_components():
    cfg = tiny_llama_config()
    with init_empty_weights():
        meta = LlamaForCausalLM(cfg)
    real = LlamaForCausalLM(cfg).to(torch.float16)
    real.model.embed_tokens.float()  # the component kept fp32
    comps = llama_components(meta)
    layout = describe_model(meta, comps, {"layers"}, torch.float16, fp32_components=["embed"])
    assert layout.total_bytes == real_bytes(real)
    assert layout.component("embed").blocks[0].compute_bytes == 4
    assert not layout.component("embed").autoregressive


def test_integer_buffers_keep_their_size_and_leftovers_are_covered():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.register_buffer("offsets", torch.arange(5, dtype=torch.int64))
            self.scale = nn.Parameter(torch.ones(3))
            self.post = nn.Sequential(nn.LayerNorm(8))

    toy = Toy()
    layout = describe_model(toy, {"blocks": toy.blocks}, set(), torch.float16)
    other = layout.component("other")
    names = {b.name: b.bytes for b in other.blocks}
    assert names == {"offsets": 5 * 8, "scale": 3 * 2, "post": 16 * 2}
    assert layout.total_bytes == 2 * (72 * 2) + 40 + 6 + 32


def test_tied_inside_one_block_counted_once():
    m = build_on_meta(tiny_llama_config(tie_word_embeddings=True), LlamaForCausalLM)
    whole = describe_model(m, {"all": m}, {"all"}, torch.float16)
    split = describe_model(m, llama_components(m), {"layers"}, torch.float16)
    assert len(whole.blocks) == 1 and whole.blocks[0].name == "" and whole.total_bytes == split.total_bytes


def test_overlapping_blocks_rejected():
    m = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="inside"):
        describe_model(m, {"a": m.model, "b": m.model.layers}, set(), torch.float16)


def test_layout_accepts_dtype_names():
    layout = layout_from_config(tiny_llama_config(), LlamaForCausalLM, dtype="fp16")
    assert layout.dtype == torch.float16


def test_csm_layout(csm):
    comps = {c.name: c for c in csm.components}
    assert {n: c.autoregressive for n, c in comps.items()} == {
        "embeddings": True, "backbone": True, "depth_decoder": True, "codec": False, "other": True}
    assert comps["codec"].fp32 and comps["codec"].blocks[0].compute_bytes == 4
    assert len([b for b in comps["backbone"].blocks if b.has_attention]) == 16
    assert comps["depth_decoder"].token_cap == 32 and comps["depth_decoder"].passes_per_token == 31
    # the backbone's audio embedding and the depth decoder's are one tied tensor
    tied = [b for b in csm.blocks if b.tied_with]
    assert {b.name for b in tied} == {"backbone_model.embed_tokens", "depth_decoder.model.embed_tokens"}
    meta = build_on_meta(CsmConfig(), CsmForConditionalGeneration)
    codec_params = sum(p.numel() for p in meta.codec_model.parameters())
    rest = sum(p.numel() for p in meta.parameters()) - codec_params
    assert csm.total_params == codec_params + rest
    assert 3.0 < csm.total_bytes / GIB < 3.6  # FACTS.md: ~3.3 GiB in 16-bit


def test_dia_layout(dia):
    comps = {c.name: c for c in dia.components}
    assert not comps["text_encoder"].autoregressive and comps["decoder"].autoregressive
    assert sum(b.has_attention for b in comps["decoder"].blocks) == 18
    assert 2.7 < dia.total_bytes / GIB < 3.3  # FACTS.md: ~3.0 GiB in 16-bit
    # its DAC codec is a sub-model of its own, one fp32 block (planned with it: test_plan_before_download)
    from transformers import DacConfig

    from edge_runtime.models.hf.dia import dac_layout

    dac = dac_layout(DacConfig(), torch.bfloat16).component("codec")
    assert dac.fp32 and not dac.autoregressive and len(dac.blocks) == 1 and dac.blocks[0].compute_bytes == 4


# --- budget and cost --------------------------------------------------------------------------

def test_budget_kv_cache_formula(llama_1b):
    cfg = llama_1b_config()
    b = compute_budget(profile(8), llama_1b, max_batch=4, max_tokens=1000)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expect = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 1000 * 4 * 2
    assert b.kv_cache_bytes == expect
    assert b.activation_bytes == 4 * cfg.intermediate_size * 1000 * 4 * 2
    assert b.weights_bytes == 8 * GIB - int(0.8 * GIB) - b.kv_cache_bytes - b.activation_bytes
    text = str(b)
    assert "GiB" in text and "KV cache" in text and "batch 4 x 1000" in text


def test_budget_tokens_from_profile_limits(csm):
    b = compute_budget(profile(8, chars=200, prompt_s=10), csm)
    assert b.tokens == math.ceil(200 * csm.tokens_per_char + 10 * csm.prompt_tokens_per_s)
    # one sentence at a time: a longer request text budgets one sentence of at most 300 characters
    long = compute_budget(profile(8, chars=10**6, prompt_s=10), csm)
    assert long.tokens == math.ceil(300 * csm.tokens_per_char + 10 * csm.prompt_tokens_per_s)
    assert compute_budget(profile(8, chars=10**6, prompt_s=10**4), csm).tokens == csm.max_positions


def test_cost_model_per_token_for_ar(llama_1b):
    cm = CostModel()
    layer = llama_1b.component("model.layers").blocks[0]
    comp = llama_1b.component("model.layers")
    no_pf = block_cost(cm, layer, comp, "stream:cpu", tokens=100, batch=1, prefetch=0)
    assert no_pf.per_token_s == pytest.approx(layer.bytes / cm.h2d_bytes_per_s)
    assert no_pf.per_request_s == pytest.approx(100 * no_pf.per_token_s)  # paid every token
    slow = cm.with_measured_h2d(11e9)
    assert block_cost(slow, layer, comp, "stream:cpu", 100, 1, 0).per_token_s == pytest.approx(
        2 * no_pf.per_token_s)
    unpinned = block_cost(cm, layer, comp, "stream:cpu", 100, 1, 0, pinned=False)
    assert unpinned.per_token_s > no_pf.per_token_s
    on_cpu = block_cost(cm, layer, comp, "cpu", 100, 1, 1)
    assert on_cpu.per_token_s == pytest.approx(2 * layer.compute_params * (1 / cm.cpu_flops - 1 / cm.gpu_flops))


def test_cost_model_prefetch_hides_non_ar_transfer(dia):
    cm = CostModel()
    enc = dia.component("text_encoder")
    layer = enc.blocks[1]
    hidden = block_cost(cm, layer, enc, "stream:cpu", tokens=1000, batch=1, prefetch=1)
    exposed = block_cost(cm, layer, enc, "stream:cpu", tokens=1000, batch=1, prefetch=0)
    assert exposed.per_request_s == pytest.approx(cm.transfer_s(layer.bytes, "cpu"))
    assert hidden.per_request_s < exposed.per_request_s and hidden.per_token_s == 0
    assert cm.transfer_s(1000, "disk") > cm.transfer_s(1000, "cpu")


# --- placement ---------------------------------------------------------------------------------

def check_invariants(result, layout, budget, cost=CostModel(), cpu_allowed=True):
    """The plan's own accounting holds, every block is placed, AR blocks stream only when the
    cost model says streaming is cheaper than the CPU (unless the backend cannot use the CPU)."""
    assert {b.name for b in result.blocks} == {b.name for b in layout.blocks}
    assert result.peak_vram_bytes <= budget.usable_bytes
    assert result.peak_vram_bytes + budget.reserve_bytes <= budget.vram_bytes
    assert result.resident_bytes + result.streamed_bytes + result.cpu_bytes == layout.total_bytes
    for block, p in zip(layout.blocks, result.blocks):
        if cpu_allowed and block.autoregressive and p.placement.startswith("stream:") and block.bytes:
            comp = layout.component(block.component)
            def per_token(where):
                return block_cost(cost, block, comp, where, budget.tokens, budget.batch, 1).per_token_s
            assert per_token(p.placement) <= per_token("cpu")


@pytest.mark.parametrize("model", ["llama_1b", "csm", "dia"])
@pytest.mark.parametrize("vram", TIERS)
def test_every_tier_within_budget_or_minimum_error(model, vram, request):
    layout = request.getfixturevalue(model)
    prof = profile(vram)
    budget = compute_budget(prof, layout)
    minimum = budget.reserve_bytes + budget.activation_bytes + layout.largest_block_bytes
    if budget.vram_bytes < minimum:
        with pytest.raises(PlanError, match=f"minimum of {minimum / GIB:.2f} GiB"):
            plan(layout, prof, budget, CostModel())
        return
    result = plan(layout, prof, budget, CostModel())
    check_invariants(result, layout, budget)
    if vram >= 6:  # all three are ~2-3.3 GiB in 16-bit
        assert {b.placement for b in result.blocks} == {"gpu"} and result.backend == "resident"
        assert result.extra_latency_s == 0


def test_llama_1b_splits(llama_1b):
    assert 1.9 < llama_1b.total_bytes / GIB < 2.2
    prof = profile(2)
    budget = compute_budget(prof, llama_1b)
    result = plan(llama_1b, prof, budget, CostModel())
    kinds = {b.placement for b in result.blocks}
    assert "gpu" in kinds and kinds & {"cpu", "stream:cpu"}
    assert result.backend == "streamer"
    # batch 1: a layer computes faster on the CPU than it crosses PCIe every token
    assert not any(b.placement.startswith("stream") for b in result.blocks if b.autoregressive)
    assert result.extra_latency_per_token_s > 0
    assert "ms per token" in result.table()


def test_ar_streams_when_cpu_is_predicted_slower(llama_1b):
    prof = profile(2, max_batch=16, chars=100)
    budget = compute_budget(prof, llama_1b, max_tokens=math.ceil(100 * llama_1b.tokens_per_char))  # no prompt
    slow_cpu = CostModel(cpu_flops=1e9)
    result = plan(llama_1b, prof, budget, slow_cpu)
    check_invariants(result, llama_1b, budget, slow_cpu)
    assert any(b.placement == "stream:cpu" for b in result.blocks if b.autoregressive)
    assert any("every token" in n for n in result.notes)


def test_keep_resident_honoured(csm):
    prof = profile(4, keep_resident=["codec"])
    budget = compute_budget(prof, csm)
    result = plan(csm, prof, budget, CostModel())
    assert all(b.placement == "gpu" for b in result.blocks if b.component == "codec")
    check_invariants(result, csm, budget)


def test_keep_resident_that_cannot_fit_names_component(llama_1b):
    prof = profile(2, keep_resident=["model.layers"])
    budget = compute_budget(prof, llama_1b)
    with pytest.raises(PlanError, match=r"keep_resident \['model.layers'\].*missing"):
        plan(llama_1b, prof, budget, CostModel())


def test_below_minimum_states_minimum(dia):
    prof = profile(1)
    budget = compute_budget(prof, dia)
    with pytest.raises(PlanError, match=r"below the minimum of \d+\.\d\d GiB"):
        plan(dia, prof, budget, CostModel())


@pytest.mark.parametrize("vram", [0, None])
def test_cpu_profile_all_cpu(llama_1b, vram):
    prof = profile(vram)
    budget = compute_budget(prof, llama_1b)
    assert budget.cpu_only and "CPU-only" in str(budget)
    result = plan(llama_1b, prof, budget, CostModel())
    assert {b.placement for b in result.blocks} == {"cpu"}
    assert result.peak_vram_bytes == 0 and result.backend == "resident"
    assert set(result.to_accelerate_device_map().values()) == {"cpu"}
    assert result.max_batch is None and result.to_dict()["max_batch"] is None  # no VRAM bound
    assert "batch bound: none" in result.table()


def peak_at(result, layout, prof, batch: int) -> int:
    """Peak VRAM of `result`'s placement serving `batch` requests at once."""
    budget = compute_budget(prof, layout, max_batch=batch)
    kv = sum(budget.kv_by_block.get(b.name, 0) for b in result.blocks if b.placement != "cpu")
    return result.resident_bytes + result.inflight_bytes + budget.activation_bytes + kv


@pytest.mark.parametrize("model, vram, max_batch", [
    ("llama_1b", 2, 1),  # offloaded: streams and computes on the CPU
    ("llama_1b", 8, 4),  # a fixed batch of 4 is budgeted, so it fits
    ("csm", 4, "auto"),
    ("dia", 6, 2),
])
def test_plan_bounds_the_batch_by_its_budget(model, vram, max_batch, request):
    """max_batch: the largest batch the placement holds once activations and GPU KV cache grow with it."""
    layout = request.getfixturevalue(model)
    prof = profile(vram, max_batch=max_batch)
    budget = compute_budget(prof, layout)
    result = plan(layout, prof, budget, CostModel())
    bound = result.max_batch
    assert bound >= budget.batch
    assert peak_at(result, layout, prof, bound) <= budget.usable_bytes < peak_at(result, layout, prof, bound + 1)
    assert result.to_dict()["max_batch"] == bound
    assert f"batch bound: at most {bound} requests per batch fit the budget" in result.table()


def test_backend_none_refuses_offload(llama_1b):
    prof = profile(2, backend="none")
    with pytest.raises(PlanError, match="backend is none"):
        plan(llama_1b, prof, compute_budget(prof, llama_1b), CostModel())
    prof = profile(8, backend="none")
    assert plan(llama_1b, prof, compute_budget(prof, llama_1b)).backend == "resident"


def test_prefetch_lowered_when_two_copies_do_not_fit():
    # three non-AR blocks of 1 GiB each (meta: no memory); 1.8 GiB usable holds one copy, not two
    with torch.device("meta"):
        meta = nn.Sequential(*[nn.Linear(16384, 16384, bias=False) for _ in range(3)])
    layout = describe_model(meta, {"stack": list(meta)}, set(), torch.float32)
    prof = profile(2.2, reserve_gib=0.4, prefetch=1)
    budget = compute_budget(prof, layout, max_batch=1, max_tokens=1)
    result = plan(layout, prof, budget, CostModel())
    assert result.prefetch == 0 and any("prefetch lowered" in n for n in result.notes)
    assert {b.placement for b in result.blocks} == {"stream:cpu"} and result.inflight_bytes == GIB
    check_invariants(result, layout, budget)


def test_device_map_covers_every_parameter(csm, dia):
    tied = llama_1b_config(tie_word_embeddings=True)
    from edge_runtime.models.hf.csm import CsmSpeechModel

    for layout, cfg, cls in ((csm, CsmConfig(), CsmSpeechModel.transformers_class()),
                             (dia, DiaConfig(), DiaForConditionalGeneration),
                             (layout_from_config(tied, LlamaForCausalLM), tied, LlamaForCausalLM)):
        meta = build_on_meta(cfg, cls)
        prof = profile(3, target="disk")
        result = plan(layout, prof, compute_budget(prof, layout), CostModel())
        dmap = result.to_accelerate_device_map(list(meta.state_dict()))
        check_device_map(meta, dmap)  # raises on any uncovered tensor
        assert set(dmap.values()) <= {0, "cpu", "disk"}
        for b in result.blocks:
            assert dmap[b.name] == {"gpu": 0, "cpu": "cpu", "stream:disk": "disk"}[b.placement]
        assert set(result.cpu_modules()) == {b.name for b in result.blocks if b.placement == "cpu"}
    with pytest.raises(PlanError, match="misses"):
        result.to_accelerate_device_map(["not_a_module.weight"])


def test_deepspeed_config_keys(llama_1b):
    prof = profile(2, target="nvme", offload_dir="/mnt/nvme/offload", pin_memory=True)
    budget = compute_budget(prof, llama_1b)
    result = plan(llama_1b, prof, budget, CostModel())
    assert result.backend == "deepspeed"
    assert not any(b.placement == "cpu" for b in result.blocks)  # ZeRO-3 streams, never CPU compute
    check_invariants(result, llama_1b, budget, cpu_allowed=False)
    cfg = result.to_deepspeed_config()
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "nvme"
    assert zero["offload_param"]["nvme_path"] == "/mnt/nvme/offload"
    assert zero["offload_param"]["pin_memory"] is True
    assert all(isinstance(zero[k], int) for k in (
        "stage3_max_live_parameters", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold", "stage3_max_reuse_distance"))
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert cfg["train_micro_batch_size_per_gpu"] == 1

    cpu_prof = profile(2, backend="deepspeed", target="cpu")
    cpu_cfg = plan(llama_1b, cpu_prof, compute_budget(cpu_prof, llama_1b)).to_deepspeed_config()
    assert cpu_cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "nvme_path" not in cpu_cfg["zero_optimization"]["offload_param"]
    no_dir = profile(2, target="nvme")  # null offload_dir: the user cache dir
    ds = plan(llama_1b, no_dir, compute_budget(no_dir, llama_1b)).to_deepspeed_config()
    assert ds["zero_optimization"]["offload_param"]["nvme_path"].endswith("offload")


def test_target_override_and_bad_combinations(dia):
    prof = profile(3)
    budget = compute_budget(prof, dia)
    result = plan(dia, prof, budget, CostModel(), target="disk")
    assert any(b.placement == "stream:disk" for b in result.blocks)
    assert result.backend == "streamer" and result.target == "disk"
    with pytest.raises(PlanError, match="nvme needs backend deepspeed"):
        plan(dia, profile(3, backend="accelerate"), budget, target="nvme")
    with pytest.raises(ProfileError, match="does not work with"):  # the schema refuses it in a profile
        profile(3, backend="accelerate", target="nvme")
    with pytest.raises(PlanError, match="offload.target"):
        plan(dia, prof, budget, target="tape")


def test_plan_is_deterministic_and_serialisable(csm):
    prof = profile(4)
    a = plan(csm, prof, compute_budget(prof, csm), CostModel())
    b = plan(csm, prof, compute_budget(prof, csm), CostModel())
    assert a.to_dict() == b.to_dict()
    d = a.to_dict()
    assert {"backend", "resident_bytes", "streamed_bytes", "cpu_bytes", "peak_vram_bytes", "budget",
            "extra_latency_s", "extra_latency_per_token_s", "blocks"} <= set(d)
    assert d["peak_vram_bytes"] <= prof.memory.vram_gib * GIB
    table = a.table()
    assert "peak VRAM" in table and "backbone" in table and "estimate" in table
