"""The planner's precision choice: the least lossy plan whose per-frame blocks fit the tier, then the
fastest; the quality budget and allowed precisions honoured; quantized sizes equal to what the
runtime stores; a budget nothing fits named with what a fit needs."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edge_runtime.policy.planner import PlanError, compute_budget, layout_from_config, plan
from edge_runtime.policy.planner.layout import GIB
from edge_runtime.policy.planner.precision import fits, quantized_block_bytes, quantizable_blocks
from edge_runtime.policy.profiles import load_profile
from edge_runtime.policy.quantization import INT4_GROUP_SIZE, PREDICTED_LAYER_ERROR, quantized_linear_bytes

LAYERS = "model.layers"


@functools.lru_cache(maxsize=None)
def profile(vram_gib: float, **values):
    sets = {"memory.vram_gib": vram_gib, "memory.reserve_gib": 0.8, "batching.max_batch": 1,
            "limits.max_text_chars": 300, "limits.max_prompt_seconds": 10, "offload.keep_resident": [],
            **{k.replace("__", "."): list(v) if isinstance(v, tuple) else v for k, v in values.items()}}
    return load_profile("8gb", tuple(f"{k}={json.dumps(v)}" for k, v in sets.items()))


@pytest.fixture(scope="module")
def llama_7b():
    """A Qwen2.5-7B-sized decoder (28 layers, hidden 3584): 14 GiB of bf16 weights."""
    config = LlamaConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096)
    layout = layout_from_config(config, LlamaForCausalLM, dtype=torch.bfloat16)
    return layout.replace_component(LAYERS, quantizable=True)


def planned(layout, vram_gib, **values):
    p = profile(vram_gib, **values)
    return plan(layout, p, compute_budget(p, layout))


def precisions(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in result.blocks:
        counts[b.precision] = counts.get(b.precision, 0) + 1
    return counts


def test_quantized_bytes_equal_the_storage_formula(llama_7b):
    layer = llama_7b.component(LAYERS).blocks[0]
    assert len(layer.linear_shapes) == 7  # q, k, v, o, gate, up, down
    linear = sum(o * i * 2 for o, i in layer.linear_shapes)
    rest = layer.bytes - linear  # the two RMSNorms stay bf16
    assert rest == 2 * 3584 * 2
    for precision in ("int8", "int4"):
        expected = rest + sum(quantized_linear_bytes(o, i, precision, 2) for o, i in layer.linear_shapes)
        assert quantized_block_bytes(layer, precision) == expected
    int8 = sum(o * i + o * 2 for o, i in layer.linear_shapes)
    int4 = sum(o * i // 2 + o * i // INT4_GROUP_SIZE * 4 for o, i in layer.linear_shapes)
    assert quantized_block_bytes(layer, "int8") == rest + int8
    assert quantized_block_bytes(layer, "int4") == rest + int4
    # only the marked component's per-frame layers are candidates (not the head or embeddings)
    assert {b.component for b in quantizable_blocks(llama_7b)} == {LAYERS}


def test_a_tier_that_holds_bf16_quantizes_nothing(llama_7b):
    result = planned(llama_7b, 24)
    assert not result.quantized_blocks() and fits(result, llama_7b)
    assert all(b.placement == "gpu" for b in result.blocks if b.component == LAYERS)


def test_twelve_gib_quantizes_only_as_many_layers_as_needed(llama_7b):
    result = planned(llama_7b, 12)
    chosen = result.quantized_blocks()
    assert set(chosen.values()) == {"int8"} and 0 < len(chosen) < 28
    assert fits(result, llama_7b) and result.fits and result.peak_vram_bytes <= result.budget.usable_bytes
    assert "fits: every per-frame block is on the GPU" in result.table()
    assert all(b.placement == "gpu" for b in result.blocks if b.component == LAYERS)
    # least lossy: one int8 layer fewer leaves a per-frame layer off the GPU
    fewer = dict(list(chosen.items())[:-1])
    from edge_runtime.policy.planner.precision import quantized_layout
    from edge_runtime.policy.planner.placement import place

    p = profile(12)
    smaller = place(quantized_layout(llama_7b, fewer), p, compute_budget(p, llama_7b), precisions=fewer)
    assert not fits(smaller, llama_7b)
    # each quantized row says so in the table, with its predicted error
    assert "int8" in result.table() and f"{PREDICTED_LAYER_ERROR['int8']:.3f}" in result.table()
    row = next(b for b in result.to_dict()["blocks"] if b["name"] in chosen)
    assert row["precision"] == "int8" and row["predicted_error"] == PREDICTED_LAYER_ERROR["int8"]


def test_seven_gib_goes_to_int4_after_every_layer_is_int8(llama_7b):
    assert set(planned(llama_7b, 8).quantized_blocks().values()) == {"int8"}  # 7.15 of 7.2 GiB usable
    result = planned(llama_7b, 7)
    counts = precisions(result)
    assert counts.get("int4", 0) > 0 and counts.get("int4", 0) + counts.get("int8", 0) == 28
    assert fits(result, llama_7b)


def test_quality_budget_and_allowed_list_are_honoured(llama_7b):
    strict = planned(llama_7b, 7, quantization__max_layer_error=0.02)  # int4 predicted above the budget
    assert set(strict.quantized_blocks().values()) == {"int8"} and len(strict.quantized_blocks()) == 28
    assert not fits(strict, llama_7b) and strict.fits is False  # degrades: some layers compute off the GPU, and the note says why
    assert any("does not fit 7.0 GiB" in n and "per frame" in n for n in strict.notes)
    none = planned(llama_7b, 12, quantization__allowed=())
    assert not none.quantized_blocks() and not fits(none, llama_7b)


def test_a_budget_nothing_fits_names_what_a_fit_needs(llama_7b):
    result = planned(llama_7b, 4)
    assert set(result.quantized_blocks().values()) == {"int4"}  # the most compressed candidate
    note = next(n for n in result.notes if "does not fit 4.0 GiB" in n)
    need = float(note.split("need about ")[1].split(" GiB")[0])
    assert 4.0 < need < 8.0  # int4 weights ~3.9 GiB + head, KV, reserve
    assert result.peak_vram_bytes <= result.budget.usable_bytes  # still a valid (slow) plan
    with pytest.raises(PlanError, match="minimum"):
        planned(llama_7b, 1.0)  # below even the largest single block


def test_force_quantizes_every_layer_and_deepspeed_refuses(llama_7b):
    result = planned(llama_7b, 24, quantization__force="int8")
    assert len(result.quantized_blocks()) == 28
    layer = llama_7b.component(LAYERS).blocks[0]
    row = next(b for b in result.blocks if b.name == layer.name)
    assert row.bytes == quantized_block_bytes(layer, "int8") < layer.bytes
    with pytest.raises(PlanError, match="ZeRO-3"):
        planned(llama_7b, 24, quantization__force="int8", offload__backend="deepspeed")
    # deepspeed without force plans unquantized (and says so when it does not fit)
    ds = planned(llama_7b, 12, offload__backend="deepspeed")
    assert not ds.quantized_blocks() and any("ZeRO-3" in n for n in ds.notes)


def test_cpu_profile_quantizes_only_when_forced(llama_7b):
    cpu = load_profile("cpu")
    assert not plan(llama_7b, cpu, compute_budget(cpu, llama_7b)).quantized_blocks()
    forced = load_profile("cpu", ("quantization.force=int4",))
    result = plan(llama_7b, forced, compute_budget(forced, llama_7b))
    assert set(result.quantized_blocks().values()) == {"int4"} and result.cpu_only


def test_prefill_only_blocks_leave_the_gpu_before_per_frame_ones(llama_7b):
    """Mark the FFN-heavy second half of the layers prefill-only: they stream (paid once per request,
    never per frame) while every per-frame layer stays resident."""
    comps = []
    for c in llama_7b.components:
        if c.name == LAYERS:
            half = len(c.blocks) // 2
            comps.append(dataclasses.replace(c, blocks=c.blocks[:half]))
            prefill = [dataclasses.replace(b, component="prefill", autoregressive=False, kv_elems_per_token=0)
                       for b in c.blocks[half:]]
            comps.append(dataclasses.replace(c, name="prefill", autoregressive=False, prefill_only=True,
                                             quantizable=False, blocks=tuple(prefill)))
        else:
            comps.append(c)
    layout = dataclasses.replace(llama_7b, components=tuple(comps))
    result = planned(layout, 10, quantization__allowed=())
    rows = [b for b in result.blocks if b.component == "prefill"]
    assert any(b.placement.startswith("stream:") for b in rows)
    assert all(b.extra_per_token_s == 0 for b in rows)  # their cost is per request, not per frame
    assert fits(result, layout) and not result.quantized_blocks()
    assert result.streamed_bytes >= 4 * GIB
