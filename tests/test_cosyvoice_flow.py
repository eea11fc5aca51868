"""Our CosyVoice2 flow (edge_runtime.models.cosyvoice.flow) against the reference package.

The reference runs as a subprocess in its scratch venv (.cosyvoice_ref); tests that need it skip with
the support module's reason when it is missing. Two reference runs on the tiny folder cover:
  A  the offline flow and upstream's streaming loop as the reference package runs it (fixed hop 25,
     the last chunk a full-attention pass), with upstream's own noise buffer;
  B  flow.inference(streaming=True, finalize=False) and the streaming loop with the hop growing
     25 -> 50 -> 100 as upstream's later CosyVoice2Model does and the last chunk chunk-causal,
     with injected noise.
The reference package itself keeps the hop at 25 (its CosyVoice2Model has no growth), so B's growth
is the runner's schedule driving the reference's own flow.inference / token2wav.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_support import published_yaml, reference_shapes, require_reference, run_reference, tiny_model_dir
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import flow as FL

pytestmark = pytest.mark.slow

PROMPT_A = list(range(5, 12))  # 7 tokens: the first hop is 25 + 18 (prompt + hop = 50)
TOKENS_A = list(range(100, 200))  # 100 tokens: chunks of 43, 25, 25 + the final 7
PROMPT_B = list(range(30, 60))  # 30 tokens: padded to 50 (first hop 45)
TOKENS_B = [(7 * i + 3) % 6561 for i in range(200)]  # hops 45, 50, 100, final 5
NOISE_SEED_B = 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_reference()
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def ref_a(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {"stages": ["flow", "stream"], "seed": 3, "prompt_speech_tokens": PROMPT_A, "speech_tokens": TOKENS_A}
    return run_reference(model_dir, request, tmp_path_factory.mktemp("flow") / "a.npz")


@pytest.fixture(scope="module")
def ref_b(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {"stages": ["flow", "stream"], "seed": 4, "prompt_speech_tokens": PROMPT_B, "speech_tokens": TOKENS_B,
               "noise_seed": NOISE_SEED_B, "flow_streaming": True, "flow_finalize": False,
               "stream_hop_scale": 2, "stream_max_hop": 100, "stream_final_streaming": True}
    return run_reference(model_dir, request, tmp_path_factory.mktemp("flow") / "b.npz")


@pytest.fixture(scope="module")
def flow(model_dir: Path) -> FL.CausalFlow:
    torch.set_num_threads(1)
    return FL.load(model_dir)  # strict=True inside


def _inputs(ref: dict[str, np.ndarray]) -> tuple:
    return ref["in_speech_tokens"], ref["in_prompt_speech_tokens"], ref["in_prompt_feat"], ref["in_embedding"]


def _noise_b() -> torch.Tensor:
    return torch.randn(1, 80, 15000, generator=torch.Generator().manual_seed(NOISE_SEED_B))


def _stream_chunks(stream: FL.FlowStream, ref: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Push what upstream's loop had at each chunk (tokens up to offset + hop + 3 look-ahead)."""
    tokens = ref["in_speech_tokens"][0].tolist()
    offsets = ref["stream_token_offset"].tolist()
    chunks = [stream.push(tokens[:nxt + 3]) for nxt in offsets[1:]]
    return chunks + [stream.push(tokens, finalize=True)]


def _reference_chunks(ref: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each chunk's mel as token2wav uses it: the flow's mel from 2 x token_offset on."""
    return [ref[f"stream_mel_{k}"][:, :, 2 * off:] for k, off in enumerate(ref["stream_token_offset"].tolist())]


def _compare_chunks(ours: list[torch.Tensor], theirs: list[np.ndarray]) -> float:
    assert len(ours) == len(theirs)
    worst = 0.0
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert tuple(a.shape) == b.shape, (k, tuple(a.shape), b.shape)
        worst = max(worst, float(np.abs(a.numpy() - b).max()))
    return worst


def test_offline_matches_reference_upstream_noise(flow: FL.CausalFlow, ref_a) -> None:
    """No noise and no generator: upstream's own buffer (randn after seed 0); the global RNG stays put."""
    state = torch.get_rng_state()
    mel = flow.inference(*_inputs(ref_a))
    assert torch.equal(state, torch.get_rng_state())
    assert mel.shape == ref_a["flow_mel"].shape == (1, 80, 2 * len(TOKENS_A))
    diff = np.abs(mel.numpy() - ref_a["flow_mel"]).max()
    print(f"offline max |diff| {diff:.3g} (peak {np.abs(ref_a['flow_mel']).max():.3g})")
    assert diff <= 1e-4
    assert np.abs(ref_a["flow_mel"]).max() > 0.5  # not a trivial comparison
    seeded = flow.inference(*_inputs(ref_a), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded, mel)


def test_stream_matches_reference_full_final(flow: FL.CausalFlow, ref_a) -> None:
    """Fixed hop 25 with a padded first hop; the last chunk is upstream's full-attention pass."""
    assert ref_a["stream_token_offset"].tolist() == [0, 43, 68, 93]
    stream = FL.FlowStream(flow, *_inputs(ref_a)[1:])
    diff = _compare_chunks(_stream_chunks(stream, ref_a), _reference_chunks(ref_a))
    print(f"stream (hop 25, full final) max |diff| {diff:.3g}")
    assert diff <= 1e-4


def test_streaming_inference_matches_reference(flow: FL.CausalFlow, ref_b) -> None:
    """inference(streaming=True, finalize=False): chunk masks, the last 3 tokens only look-ahead."""
    mel = flow.inference(*_inputs(ref_b), noise=_noise_b(), streaming=True, finalize=False)
    assert mel.shape == ref_b["flow_mel"].shape == (1, 80, 2 * (len(TOKENS_B) - 3))
    diff = np.abs(mel.numpy() - ref_b["flow_mel"]).max()
    print(f"inference(streaming, not final) max |diff| {diff:.3g}")
    assert diff <= 1e-4
    assert np.abs(ref_b["flow_mel"]).max() > 0.5


def test_stream_growing_hop_matches_reference(flow: FL.CausalFlow, ref_b) -> None:
    """Hops 45 (25 + prompt padding), 50, 100, then a chunk-causal final chunk; nothing recomputed."""
    assert ref_b["stream_token_offset"].tolist() == [0, 45, 95, 195]
    stream = FL.FlowStream(flow, *_inputs(ref_b)[1:], _noise_b(), final_pass="chunked")
    diff = _compare_chunks(_stream_chunks(stream, ref_b), _reference_chunks(ref_b))
    print(f"stream (hop 25/50/100, chunked final) max |diff| {diff:.3g}")
    assert diff <= 1e-4


def test_stream_equals_streaming_inference(flow: FL.CausalFlow, ref_b) -> None:
    """Incremental chunks concatenated == one chunk-causal pass over everything (ours vs ours),
    also when the keys/values stop at a cache limit and later chunks recompute from there."""
    whole = flow.inference(*_inputs(ref_b), noise=_noise_b(), streaming=True, finalize=True)
    for limit in (None, 150):
        stream = FL.FlowStream(flow, *_inputs(ref_b)[1:], _noise_b(), final_pass="chunked", max_cache_frames=limit)
        chunks = _stream_chunks(stream, ref_b)
        joined = torch.cat(chunks, dim=2)
        diff = (joined - whole).abs().max().item()
        print(f"stream (cache limit {limit}) vs inference(streaming) max |diff| {diff:.3g}")
        assert joined.shape == whole.shape
        assert diff <= 1e-4


def test_prompt_chunks_precomputed_before_tokens(flow: FL.CausalFlow, ref_b) -> None:
    """A push with no tokens computes the prompt's whole chunks; results are unchanged."""
    stream = FL.FlowStream(flow, *_inputs(ref_b)[1:], _noise_b(), final_pass="chunked")
    assert stream.push([]).shape == (1, 80, 0)
    assert stream.cache_nbytes > 0  # the prompt's first chunk (25 of its 30 tokens) is cached
    first = stream.push(TOKENS_B[:48])
    expected = _reference_chunks(ref_b)[0]
    assert np.abs(first.numpy() - expected).max() <= 1e-4


def test_bad_inputs_raise_invalid_input(flow: FL.CausalFlow) -> None:
    feat = torch.zeros(1, 4, 80)
    emb = torch.ones(1, 192)
    with pytest.raises(InvalidInputError, match="out of range"):
        flow.inference([1, 6561], [1, 2], feat, emb)
    with pytest.raises(InvalidInputError, match="frames per token"):
        flow.inference([1, 2], [1, 2], torch.zeros(1, 5, 80), emb)
    with pytest.raises(InvalidInputError, match="embedding"):
        flow.inference([1, 2], [1, 2], feat, torch.ones(1, 80))
    with pytest.raises(InvalidInputError, match="covers 5 frames"):
        flow.inference([1, 2], [1, 2], feat, emb, noise=torch.zeros(1, 80, 5))
    stream = FL.FlowStream(flow, [1, 2], feat, emb)
    stream.push([5, 6, 7, 8])
    with pytest.raises(InvalidInputError, match="must extend"):
        stream.push([5, 9, 7, 8, 9])
    stream.push([5, 6, 7, 8, 9], finalize=True)
    with pytest.raises(InvalidInputError, match="finalised"):
        stream.push([5, 6, 7, 8, 9])


def test_cache_size_estimate() -> None:
    cfg = FL.FlowConfig()
    # 56 attention layers x (K + V) x 512 x 2 guidance branches x 10 steps, fp32
    assert cfg.attention_layers == 56
    assert 4.5e6 < cfg.cache_bytes_per_frame(4) < 4.7e6
    assert cfg.cache_bytes_per_frame(2) * 2 == cfg.cache_bytes_per_frame(4)


def test_published_keys_and_shapes_match_reference(tmp_path: Path) -> None:
    yaml_path = published_yaml(tmp_path)
    theirs = reference_shapes(yaml_path, "flow")
    cfg = FL.FlowConfig.from_yaml(yaml_path)
    assert cfg == FL.FlowConfig()  # the published numbers are the defaults
    ours = FL.build(cfg, device="meta")
    mine = {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(mine) == sorted(theirs)
    assert mine == theirs
    n = sum(v.numel() for v in ours.parameters())
    assert 112.4e6 < n < 112.7e6, n  # ~112.6M as published
