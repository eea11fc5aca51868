"""Quantized residency (runtime/backends/quantized*.py) on a tiny random Llama saved SHARDED:
QuantizedLinear's kernels equal its dequantized weight and store exactly the policy's bytes; a
plan's quantized blocks load through resident, streamer (cpu and disk) and accelerate with
identical logits; a streamed quantized block moves its quantized bytes; the quantized file is
written once and reused; bad input gets clear errors. CPU here; the CUDA layouts at the end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_runtime.policy.quantization import INT4_GROUP_SIZE, int4_quantizable, quantized_linear_bytes
from edge_runtime.runtime.backends import BackendError, LoadRequest, load_model
from edge_runtime.runtime.backends import quantized as quantized_mod
from edge_runtime.runtime.backends.quantized_linear import QuantizedLinear

CPU = torch.device("cpu")
# every Linear int4-able: in_features multiples of the group, out_features of 16
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
LM_BLOCKS = [f"model.layers.{i}" for i in range(CONFIG["num_hidden_layers"])]
# relative output error per layer (bf16 activations, the tiny Llama's N(0, 0.02) weights): measured
# 0.007 int8 and 0.09 int4 (group 64); int4's bound is that plus headroom
INT8_MAX_ERROR, INT4_MAX_ERROR = 0.02, 0.15


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIG)


def _build():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_config())


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "edge_cache"  # shared by the module: reuse is tested
    monkeypatch.setenv("EDGE_RUNTIME_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Llama saved sharded (several shards), plus its state dict."""
    torch.manual_seed(0)
    model = _build().eval()
    root = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(root, max_shard_size="300KB")
    index = root / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) >= 3
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_plan():
    """The planner's plan of the tiny Llama (everything resident), unquantized."""
    from accelerate import init_empty_weights

    from edge_runtime.policy.planner import compute_budget, describe_model, plan
    from edge_runtime.policy.profiles import load_profile

    with init_empty_weights():
        skeleton = _build()
    layout = describe_model(skeleton, _components(skeleton), autoregressive=("lm",), dtype=torch.float32)
    profile = load_profile("24gb", ("quantization.allowed=[]", "precision.dtype=fp32"))
    result = plan(layout, profile, compute_budget(profile, layout))
    assert result.quantized_blocks() == {} and not result.offloaded, result.table()
    return result


def _components(model):
    return {"embed": model.model.embed_tokens, "lm": list(model.model.layers),
            "head": [model.model.norm, model.lm_head]}


def quantized_plan(plan, precision: str, placement: str = "gpu"):
    """``plan`` with every LM layer stored at ``precision`` and placed at ``placement``."""
    blocks = tuple(dataclasses.replace(b, precision=precision, placement=placement) if b.name in LM_BLOCKS else b
                   for b in plan.blocks)
    target = placement.split(":")[1] if placement.startswith("stream:") else plan.target
    return dataclasses.replace(plan, blocks=blocks, target=target)


def logits(backend, checkpoint, plan, ids, dtype=torch.float32, **kw):
    request = LoadRequest(build=_build, checkpoint=checkpoint, plan=plan, device=CPU, dtype=dtype, **kw)
    loaded = load_model(request, backend)
    try:
        with torch.inference_mode():
            first = loaded.model(input_ids=ids, use_cache=False).logits
            moved = loaded.stats.bytes_moved
            second = loaded.model(input_ids=ids, use_cache=False).logits
        assert torch.equal(first, second)
        return first, moved, loaded
    finally:
        loaded.close()


def reference_logits(state, ids, dtype=torch.float32):
    model = _build().eval()
    model.load_state_dict(state)
    with torch.inference_mode():
        return model.to(dtype)(input_ids=ids, use_cache=False).logits


def block_bytes(state, block: str, precision: str, itemsize: int) -> int:
    """A quantized block's bytes: its Linears at ``precision`` (policy formula), the rest in the
    compute dtype."""
    total = 0
    for name, tensor in state.items():
        if not name.startswith(block + "."):
            continue
        if name.endswith("_proj.weight"):
            out_features, in_features = tensor.shape
            total += quantized_linear_bytes(out_features, in_features, precision, itemsize)
        else:
            total += tensor.numel() * itemsize
    return total


# -- the module ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision,layout", [("int8", ""), ("int4", "cpu"), ("int4", "plain")])
def test_kernel_equals_dequantized_reference_and_bytes_equal_policy(precision, layout, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    q = QuantizedLinear.from_linear(linear, precision, dtype, layout or None)
    assert (q.precision, q.qweight.dtype, q.scales.dtype) == (precision, q.qweight.dtype, dtype)
    assert not any(p.requires_grad for p in q.parameters())
    assert q.stored_bytes == quantized_linear_bytes(96, 256, precision, dtype.itemsize)
    for shape in [(256,), (3, 256), (2, 5, 256)]:
        x = torch.randn(shape).to(dtype)
        y = q(x)
        assert y.shape == (*shape[:-1], 96) and y.dtype == dtype
        expected = x.float() @ q.dequantize().float().t() + q.bias.float()
        # fp32: the same sum in another order; bf16: the kernels round to bf16 at different steps
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert ((y.float() - expected).norm() / expected.norm()).item() < tol
    if dtype == torch.float32:  # activations of another dtype are cast in and back out
        assert q(torch.randn(4, 256, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("precision,bound", [("int8", INT8_MAX_ERROR), ("int4", INT4_MAX_ERROR)])
def test_layer_error_within_bound(saved, precision, bound):
    _, state = saved
    x = torch.randn(32, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(2)).bfloat16()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        linear = nn.Linear(*state[name].shape[::-1], bias=False)
        linear.weight.data = state[name].clone()
        exact = x.float() @ state[name].t()
        y = QuantizedLinear.from_linear(linear, precision, torch.bfloat16)(x).float()
        error = ((y - exact).norm() / exact.norm()).item()
        assert error <= bound, (name, precision, error)
        assert precision == "int4" or error > 1e-4  # it does quantize


def test_int4_refused_shapes_fall_back_to_int8():
    assert int4_quantizable(2 * INT4_GROUP_SIZE, 48) and not int4_quantizable(2 * INT4_GROUP_SIZE, 40)
    assert not int4_quantizable(INT4_GROUP_SIZE + 32)
    for in_features, out_features in [(INT4_GROUP_SIZE + 32, 48), (2 * INT4_GROUP_SIZE, 40)]:
        q = QuantizedLinear.from_linear(nn.Linear(in_features, out_features), "int4", torch.float32)
        assert q.precision == "int8"
        assert q.stored_bytes == quantized_linear_bytes(out_features, in_features, "int8", 4)


# -- through the backends -----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_every_backend_computes_the_same_quantized_model(saved, ids, base_plan, precision, tmp_path):
    root, state = saved
    index = root / "model.safetensors.index.json"
    resident, _, loaded = logits("resident", index, quantized_plan(base_plan, precision), ids)
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantizedLinear) and layer.mlp.down_proj.precision == precision
    assert isinstance(loaded.model.lm_head, nn.Linear)  # outside the quantized blocks: untouched
    # close to the unquantized model (four layers' errors compound in the random model's logits:
    # measured 0.016 int8, 0.20 int4)
    exact = reference_logits(state, ids)
    error = ((resident - exact).norm() / exact.norm()).item()
    assert error < (0.03 if precision == "int8" else 0.3), error
    assert error > 1e-5  # and really quantized
    per_block = block_bytes(state, LM_BLOCKS[0], precision, 4)
    for placement in ("stream:disk", "stream:cpu"):
        plan = quantized_plan(base_plan, precision, placement)
        for backend in ("streamer", "accelerate"):
            out, moved, loaded = logits(backend, index, plan, ids, offload_dir=tmp_path)
            assert torch.equal(out, resident), (backend, placement)
            if placement == "stream:disk":  # one forward: each streamed block read once, quantized
                assert loaded.stats.loads == 2 * len(LM_BLOCKS)
                assert moved == len(LM_BLOCKS) * per_block, (backend, moved, per_block)


def test_bf16_backends_agree(saved, ids, base_plan, tmp_path):
    root, _ = saved
    index = root / "model.safetensors.index.json"
    resident, _, _ = logits("resident", index, quantized_plan(base_plan, "int8"), ids, torch.bfloat16)
    streamed, moved, _ = logits("streamer", index, quantized_plan(base_plan, "int8", "stream:disk"), ids,
                                torch.bfloat16, offload_dir=tmp_path)
    assert torch.equal(resident, streamed)
    assert moved == len(LM_BLOCKS) * block_bytes(saved[1], LM_BLOCKS[0], "int8", 2)


def test_a_block_that_is_a_linear(saved, ids, base_plan, tmp_path):
    """An untied lm_head is its own block (VibeVoice-Large quantizes it): the block itself is swapped."""
    root, _ = saved
    index = root / "model.safetensors.index.json"
    names = {b.name for b in base_plan.blocks}
    assert "lm_head" in names
    plans = {}
    for placement in ("gpu", "stream:disk"):
        plan = quantized_plan(base_plan, "int8")
        plans[placement] = dataclasses.replace(plan, blocks=tuple(
            dataclasses.replace(b, precision="int8", placement=placement) if b.name == "lm_head" else b
            for b in plan.blocks))
    resident, _, loaded = logits("resident", index, plans["gpu"], ids)
    assert isinstance(loaded.model.lm_head, QuantizedLinear)
    streamed, _, _ = logits("streamer", index, plans["stream:disk"], ids, offload_dir=tmp_path)
    assert torch.equal(resident, streamed)


def test_every_checkpoint_layout_gives_the_same_model(saved, ids, base_plan, tmp_path):
    from safetensors.torch import save_file

    root, state = saved
    single = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    plan = quantized_plan(base_plan, "int8")
    outs = [logits("resident", path, plan, ids)[0] for path in (root / "model.safetensors.index.json", root,
                                                                  single, folder)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_quantized_file_written_once_and_reused(saved, ids, base_plan, cache, monkeypatch):
    root, _ = saved
    index = root / "model.safetensors.index.json"
    plan = quantized_plan(base_plan, "int4")
    first = logits("resident", index, plan, ids)[0]
    before = {p: p.stat().st_mtime_ns for p in (cache / "quantized").rglob("*")}
    overlays = [json.loads(p.read_text()) for p in before if p.name == quantized_mod.INDEX]
    overlays = [o for o in overlays if set(o["metadata"]["precisions"].values()) == {"int4"}]
    assert len(overlays) == 1
    overlay = overlays[0]
    assert overlay["metadata"]["overlay"] is True
    quantized_names = {n for n, f in overlay["weight_map"].items() if f == quantized_mod.TENSORS}
    assert quantized_names and all(n.endswith((".qweight", ".scales")) for n in quantized_names)
    # every other tensor is read from the original shards (absolute paths), nothing copied
    assert all(Path(f).parent == root for f in overlay["weight_map"].values() if f != quantized_mod.TENSORS)

    def no_write(*args, **kwargs):
        raise AssertionError("the cached quantized file was written again")

    monkeypatch.setattr(quantized_mod, "_write", no_write)
    assert torch.equal(logits("resident", index, plan, ids)[0], first)
    after = {p: p.stat().st_mtime_ns for p in (cache / "quantized").rglob("*")}
    assert after == before


def test_planner_force_loads_quantized(saved, ids, base_plan):
    """quantization.force through the real planner: its plan loads, as the hand-made one does."""
    from accelerate import init_empty_weights

    from edge_runtime.policy.planner import compute_budget, describe_model, plan
    from edge_runtime.policy.profiles import load_profile

    with init_empty_weights():
        skeleton = _build()
    layout = describe_model(skeleton, _components(skeleton), autoregressive=("lm",), dtype=torch.float32)
    layout = layout.replace_component("lm", quantizable=True)
    profile = load_profile("24gb", ("quantization.force=int8", "precision.dtype=fp32"))
    forced = plan(layout, profile, compute_budget(profile, layout))
    assert forced.quantized_blocks() == {b: "int8" for b in LM_BLOCKS}, forced.table()
    root, _ = saved
    index = root / "model.safetensors.index.json"
    out = logits("auto", index, forced, ids)[0]
    assert torch.equal(out, logits("resident", index, quantized_plan(base_plan, "int8"), ids)[0])


def test_bad_inputs_get_clear_errors(saved, ids, base_plan, tmp_path):
    root, state = saved
    torch.save(state, tmp_path / "tiny.pt")
    with pytest.raises(BackendError, match="quantized blocks need a safetensors checkpoint"):
        logits("resident", tmp_path / "tiny.pt", quantized_plan(base_plan, "int8"), ids)
    with pytest.raises(BackendError, match="ZeRO-3 cannot partition.*streamer or accelerate"):
        logits("deepspeed", root, quantized_plan(base_plan, "int8", "stream:cpu"), ids)
    bad = dataclasses.replace(base_plan, blocks=tuple(dataclasses.replace(b, precision="int2") if b.name in LM_BLOCKS
                                                      else b for b in base_plan.blocks))
    with pytest.raises(BackendError, match="int2"):
        logits("resident", root, bad, ids)


# -- CUDA layouts (run on a GPU machine) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_kernels_equal_dequantized_reference(precision):
    torch.manual_seed(0)
    linear = nn.Linear(512, 256).cuda()
    q = QuantizedLinear.from_linear(linear, precision, torch.bfloat16)
    if precision == "int4":
        expected_layout = "cuda" if torch.cuda.get_device_capability() >= (8, 0) else "plain"
        assert q.layout == expected_layout
    assert q.stored_bytes == quantized_linear_bytes(256, 512, precision, 2)
    for rows in (1, 64):  # int8: the decode kernel, then the dequantized GEMM
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ q.dequantize().float().t() + q.bias.float()
        assert ((q(x).float() - expected).norm() / expected.norm()).item() < 1e-2
    exact = x.float() @ linear.weight.float().t() + linear.bias.float()
    error = ((q(x).float() - exact).norm() / exact.norm()).item()
    assert error < (0.02 if precision == "int8" else 0.15)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_streamer_equals_resident(saved, ids, base_plan, precision, tmp_path):
    root, _ = saved
    index = root / "model.safetensors.index.json"
    dev = torch.device("cuda")
    outs = {}
    for backend, placement in (("resident", "gpu"), ("streamer", "stream:cpu"), ("streamer", "stream:disk"),
                               ("accelerate", "stream:cpu")):
        request = LoadRequest(build=_build, checkpoint=index, plan=quantized_plan(base_plan, precision, placement),
                              device=dev, dtype=torch.bfloat16, offload_dir=tmp_path)
        loaded = load_model(request, backend)
        try:
            with torch.inference_mode():
                outs[(backend, placement)] = loaded.model(input_ids=ids.to(dev), use_cache=False).logits.cpu()
        finally:
            loaded.close()
    first = next(iter(outs.values()))
    for key, out in outs.items():
        assert torch.equal(out, first), key
