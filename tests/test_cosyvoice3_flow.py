"""Our CosyVoice3 flow (edge_runtime.models.cosyvoice.dit) against upstream's CausalMaskedDiffWithDiT.

Upstream's outputs come from tests/fixtures/cosyvoice3 (scripts/cosyvoice3_fixtures.py: a tiny
random model, DiT dim 64 x depth 2): flow_case holds the offline mel and the chunks upstream's
CosyVoice3Model streamed (hops 40, 50, 100 tokens with 3 look-ahead tokens each, chunk-causal
attention; the last chunk a full-attention pass), both with injected noise. Our FlowStream computes
each chunk's frames once (keys/values per Euler step) where upstream re-runs the flow over all
tokens; the chunks must agree all the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import dit, yaml_config
from edge_runtime.models.cosyvoice.dit.layers import RotaryEmbedding

FIXTURES = Path(__file__).parent / "fixtures" / "cosyvoice3"
TOL = 1e-4

if not FIXTURES.is_dir():
    pytest.skip("tests/fixtures/cosyvoice3 missing (scripts/cosyvoice3_fixtures.py writes it)",
                allow_module_level=True)


def _tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURES / name)


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="module")
def flow() -> dit.CausalFlowDiT:
    torch.set_num_threads(1)
    model = dit.build(dit.DiTFlowConfig.from_yaml(FIXTURES / "cosyvoice3.yaml"))
    model.load_state_dict(_tensors("flow.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return _tensors("flow_case.safetensors")


def _args(case: dict[str, torch.Tensor], tokens: int | None = None) -> tuple:
    target = case["tokens"] if tokens is None else case["tokens"][:tokens]
    return target, case["prompt_tokens"], case["prompt_feat"], case["embedding"]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _push_hops(stream: dit.FlowStream, case: dict, hops: list[dict]) -> list[torch.Tensor]:
    """What upstream's loop gave the flow at each chunk: the first ``tokens[1]`` tokens."""
    tokens = case["tokens"].tolist()
    return [stream.push(tokens[:hop["tokens"][1]], finalize=hop["finalize"]) for hop in hops]


# -- keys, shapes, config ---------------------------------------------------------------------------
def test_published_keys_and_shapes_match_manifest() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["flow.pt"]
    ours = {k: list(v.shape) for k, v in dit.build(device="meta").state_dict().items()}
    assert ours == manifest


def test_tiny_yaml_reads_the_fixture_sizes(flow: dit.CausalFlowDiT, cases: dict) -> None:
    tiny, cfg = cases["tiny"], flow.cfg
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.head_dim, cfg.ff_mult, cfg.lookahead_channels) == (
        tiny["dit_dim"], tiny["dit_depth"], tiny["dit_heads"], tiny["dit_dim_head"], tiny["dit_ff_mult"],
        tiny["lookahead_channels"])
    assert (cfg.chunk_tokens, cfg.chunk_frames, cfg.n_timesteps, cfg.cfg_rate) == (25, 50, 10, 0.7)


def test_placement_units_cover_every_weight_once(flow: dit.CausalFlowDiT) -> None:
    units = flow.decoder.estimator.placement_units()
    names = [n for u in units for n, _ in u.named_parameters()] + \
        [n for u in units for n, _ in u.named_buffers()]
    owned = [id(t) for u in units for t in [*u.parameters(), *u.buffers()]]
    estimator = flow.decoder.estimator
    assert sorted(owned) == sorted(id(t) for t in [*estimator.parameters(), *estimator.buffers()])
    assert len(names) == len(owned)


def test_cache_bytes_per_frame_at_published_size() -> None:
    # 22 blocks x (k, v) x 1024 x 2 guidance branches x 10 steps x fp32
    assert dit.DiTFlowConfig().cache_bytes_per_frame() == 22 * 2 * 1024 * 2 * 10 * 4


# -- parity with upstream ---------------------------------------------------------------------------
def test_offline_mel_matches_upstream(flow: dit.CausalFlowDiT, case: dict) -> None:
    mel = flow.inference(*_args(case), noise=case["noise"])
    assert mel.dtype == torch.float32
    assert _diff(mel, case["mel"]) <= TOL


def test_streamed_chunks_match_upstream(flow: dit.CausalFlowDiT, case: dict, cases: dict) -> None:
    hops = cases["flow"]["stream_hops"]
    assert [h["finalize"] for h in hops][-1] and not any(h["finalize"] for h in hops[:-1])
    chunks = _push_hops(dit.FlowStream(flow, case["prompt_tokens"], case["prompt_feat"], case["embedding"],
                                       case["noise"]), case, hops)
    assert len(chunks) == len(hops)
    for i, chunk in enumerate(chunks):
        assert _diff(chunk, case[f"chunk_{i}"]) <= TOL, f"chunk {i}"


def test_streaming_inference_matches_upstream_chunk(flow: dit.CausalFlowDiT, case: dict, cases: dict) -> None:
    """The non-incremental path (inference(streaming=True, finalize=False)), as upstream calls it."""
    hop = cases["flow"]["stream_hops"][2]
    mel = flow.inference(*_args(case, hop["tokens"][1]), noise=case["noise"], streaming=True, finalize=False)
    assert _diff(mel[:, :, 2 * hop["token_offset"]:], case["chunk_2"]) <= TOL


def test_streams_with_a_cache_limit_and_a_fork_give_the_same_chunks(flow: dit.CausalFlowDiT, case: dict,
                                                                    cases: dict) -> None:
    """Past max_cache_frames the keys/values are recomputed per push (rotary positions must still be
    absolute); a fork taken after the prompt continues like the original."""
    hops = cases["flow"]["stream_hops"]
    base = dit.FlowStream(flow, case["prompt_tokens"], case["prompt_feat"], case["embedding"], case["noise"],
                          max_cache_frames=50)
    assert base.push([]).shape == (1, 80, 0)  # the prompt's own chunk, computed early
    for stream in (base.fork(), base):
        for i, chunk in enumerate(_push_hops(stream, case, hops)):
            assert _diff(chunk, case[f"chunk_{i}"]) <= TOL, f"chunk {i}"


def test_chunked_final_pass_equals_streaming_inference(flow: dit.CausalFlowDiT, case: dict, cases: dict) -> None:
    tokens = 120
    hops = [h for h in cases["flow"]["stream_hops"] if h["tokens"][1] < tokens]
    stream = dit.FlowStream(flow, case["prompt_tokens"], case["prompt_feat"], case["embedding"], case["noise"],
                            final_pass="chunked")
    ids = case["tokens"][:tokens].tolist()
    pieces = [stream.push(ids[:h["tokens"][1]]) for h in hops] + [stream.push(ids, finalize=True)]
    whole = flow.inference(*_args(case, tokens), noise=case["noise"], streaming=True)
    assert _diff(torch.cat(pieces, dim=2), whole) <= 1e-5


def test_end_to_end_case_mel(flow: dit.CausalFlowDiT) -> None:
    e2e = _tensors("e2e_case.safetensors")
    mel = flow.inference(e2e["tokens"], e2e["prompt_tokens"], e2e["prompt_feat"], e2e["embedding"], noise=e2e["noise"])
    assert _diff(mel, e2e["mel"]) <= TOL


# -- half precision -----------------------------------------------------------------------------------
def test_rotary_tables_stay_exact_when_the_buffer_is_cast() -> None:
    rot = RotaryEmbedding(64)
    exact = rot(1000, 1010)
    rot.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(rot(1000, 1010), exact))


def test_bf16_flow_is_close_to_fp32(flow: dit.CausalFlowDiT, case: dict) -> None:
    """scripts/cosyvoice3_dtype.py measures this in detail (solver and rotary kept fp32)."""
    import copy

    half = copy.deepcopy(flow).to(torch.bfloat16)
    mel = half.inference(*_args(case, 60), noise=case["noise"])
    ref = flow.inference(*_args(case, 60), noise=case["noise"])
    assert mel.dtype == torch.float32 and torch.isfinite(mel).all()
    assert _diff(mel, ref) < 0.05


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    (lambda a: {**a, "tokens": [1, 2, 6561]}, "tokens"),
    (lambda a: {**a, "prompt_tokens": [[-1, 3]]}, "prompt_tokens"),
    (lambda a: {**a, "prompt_feat": a["prompt_feat"][:, :-1]}, "prompt_feat"),
    (lambda a: {**a, "embedding": torch.zeros(1, 80)}, "embedding"),
    (lambda a: {**a, "noise": a["noise"][:, :, :30]}, "noise"),
    (lambda a: {**a, "tokens": [1, 2], "finalize": False}, "tokens"),
])
def test_bad_input_names_the_field(flow: dit.CausalFlowDiT, case: dict, change, field: str) -> None:
    args = {"tokens": case["tokens"][:20], "prompt_tokens": case["prompt_tokens"], "prompt_feat": case["prompt_feat"],
            "embedding": case["embedding"], "noise": case["noise"]}
    args = change(args)
    with pytest.raises(InvalidInputError, match=field):
        flow.inference(args.pop("tokens"), args.pop("prompt_tokens"), args.pop("prompt_feat"), args.pop("embedding"),
                       **args)


def _yaml_with(edit) -> tuple[dict, dict]:
    data = yaml_config.load(FIXTURES / "cosyvoice3.yaml")
    edit(data["flow"], data)
    return data["flow"], data


@pytest.mark.parametrize("edit, key", [
    (lambda f, top: f["decoder"]["estimator"].update(long_skip_connection=True), "long_skip_connection"),
    (lambda f, top: f["decoder"]["estimator"].update(static_chunk_size=40), "static_chunk_size"),
    (lambda f, top: f["decoder"]["estimator"].update(mel_dim=100), "mel_dim"),
    (lambda f, top: f["decoder"]["estimator"].pop("dim"), "estimator"),
    (lambda f, top: f["decoder"]["cfm_params"]["content"].update(t_scheduler="exp"), "t_scheduler"),
    (lambda f, top: f["decoder"]["estimator"].update(dim_head=15), "dim_head"),
    (lambda f, top: f["decoder"]["estimator"].update(depth="<nowhere> * 2"), "depth"),
])
def test_unsupported_yaml_names_the_key(edit, key: str) -> None:
    section, top = _yaml_with(edit)
    with pytest.raises(InvalidInputError, match=key):
        dit.DiTFlowConfig.from_section(section, top)
