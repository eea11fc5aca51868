"""The family's request pipeline (tokens -> flow -> HiFT) against the reference, end to end: the whole
sentence, and streaming chunk for chunk (our incremental flow + vocoder caches vs upstream's
token2wav loop re-running the flow over all tokens for every chunk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edge_runtime
from cosyvoice_support import require_reference, run_reference, tiny_model_dir
from edge_runtime.models.cosyvoice.flow.inputs import NOISE_FRAMES
from edge_runtime.models.cosyvoice.schedule import StreamSchedule
from edge_runtime.prepared_voice import PreparedVoice

pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8, 9, 10, 11]  # 7 tokens: the first hop is padded to 25 + 18
SPEECH = [(37 * i + 11) % 6561 for i in range(110)]  # hops 43, 50, then the rest (final chunk)
SEED, NOISE_SEED = 3, 7


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    require_reference()
    folder = tiny_model_dir(tmp_path_factory)
    rt = edge_runtime.load(str(folder), profile="cpu", overrides=("runtime.threads=1", "precision.dtype=fp32"))
    yield folder, rt
    rt.close()


def reference(folder: Path, tmp_path: Path, stages: list[str], **fields) -> dict[str, np.ndarray]:
    request = {"stages": stages, "seed": SEED, "noise_seed": NOISE_SEED, "prompt_speech_tokens": PROMPT,
               "speech_tokens": SPEECH, **fields}
    return run_reference(folder, request, tmp_path / "ref.npz")


def our_request(rt, ref: dict[str, np.ndarray]):
    """Our request on the reference's inputs: its prompt mel and embedding, the same flow noise
    (a Generator seeded NOISE_SEED, as the runner's noise_seed) and the vocoder's source drawn from a
    Generator seeded SEED (the runner seeds the global RNG with SEED before vocoding)."""
    voice = PreparedVoice(tensors={"speech_tokens": torch.tensor(PROMPT, dtype=torch.int32),
                                   "prompt_feat": torch.from_numpy(ref["in_prompt_feat"][0]),
                                   "embedding": torch.from_numpy(ref["in_embedding"][0])},
                          model_id="tiny", sample_rate=16000, extra={"mode": "cross_lingual"})
    noise = torch.randn(1, 80, NOISE_FRAMES, generator=torch.Generator().manual_seed(NOISE_SEED))
    return rt.model.pipeline.request([1, 2, 3], [], [], voice, torch.Generator().manual_seed(SEED), noise=noise)


def test_whole_sentence_equals_reference_flow_then_hift(runtime, tmp_path):
    folder, rt = runtime
    ref = reference(folder, tmp_path, ["flow", "hift"])
    wav = our_request(rt, ref).whole(tokens=SPEECH)
    diff = np.abs(wav - ref["hift_wav"][0]).max()
    print(f"tokens -> mel -> wav: {len(wav)} samples, max |diff| {diff:.3g}")
    assert wav.shape == ref["hift_wav"][0].shape and diff <= 1e-4
    assert np.abs(ref["hift_wav"]).max() > 1e-3


def compare_chunks(ours: list[np.ndarray], ref: dict[str, np.ndarray]) -> None:
    theirs = [ref[f"stream_wav_{k}"][0] for k in range(len(ref["stream_token_offset"]) + 1)
              if f"stream_wav_{k}" in ref]
    assert [len(c) for c in ours] == [len(c) for c in theirs]
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)]
    print("chunk samples", [len(c) for c in ours], "max |diff|", [f"{d:.3g}" for d in diffs])
    assert max(diffs) <= 1e-4
    assert np.abs(ref["stream_wav"]).max() > 1e-3


def test_stream_growing_hops_chunked_final_equals_reference(runtime, tmp_path):
    """Our default: hops 25 (+ prompt padding), 50, 100; the last chunk chunk-causal like the others.
    The reference runs upstream's token2wav loop with the same hops and its final call in streaming
    mode."""
    folder, rt = runtime
    ref = reference(folder, tmp_path, ["stream"], stream_hop_scale=2, stream_max_hop=100,
                    stream_final_streaming=True)
    assert ref["stream_token_offset"].tolist()[:3] == [0, 43, 93]
    pipe = rt.model.pipeline
    assert pipe.final_pass == "chunked" and pipe.schedule == StreamSchedule()
    compare_chunks(list(our_request(rt, ref).stream(tokens=SPEECH)), ref)


def test_stream_upstream_schedule_equals_reference(runtime, tmp_path):
    """Upstream's own schedule (the reference package's: hop 25 throughout, final full-attention
    pass), set on our pipeline, gives upstream's streamed audio chunk for chunk."""
    folder, rt = runtime
    ref = reference(folder, tmp_path, ["stream"])
    pipe = rt.model.pipeline
    saved = pipe.schedule, pipe.final_pass
    pipe.schedule, pipe.final_pass = StreamSchedule(max_hop=25), "full"
    try:
        compare_chunks(list(our_request(rt, ref).stream(tokens=SPEECH)), ref)
    finally:
        pipe.schedule, pipe.final_pass = saved


def test_each_request_has_its_own_hop(runtime, tmp_path):
    """Upstream grows the hop on the model and never resets it; here the third request's first chunk
    is as early as the first request's."""
    _, rt = runtime
    inputs = {"in_prompt_feat": np.random.default_rng(0).standard_normal((1, 2 * len(PROMPT), 80), np.float32),
              "in_embedding": np.ones((1, 192), np.float32)}
    firsts = [len(next(iter(our_request(rt, inputs).stream(tokens=SPEECH)))) for _ in range(3)]
    assert firsts[0] == firsts[1] == firsts[2]


def test_voice_prompt_state_is_reused_exactly(runtime):
    """The flow's work on a voice prompt is kept for the last voice: a request with that voice starts
    from it and gives exactly the audio of one that computes it again."""
    _, rt = runtime
    g = torch.Generator().manual_seed(9)
    voice = PreparedVoice(tensors={"speech_tokens": torch.randint(0, 6561, (60,), generator=g, dtype=torch.int32),
                                   "prompt_feat": torch.randn(120, 80, generator=g) - 5,
                                   "embedding": torch.randn(192, generator=g)},
                          model_id="tiny", sample_rate=16000, extra={"mode": "cross_lingual"})
    pipe = rt.model.pipeline

    def streamed() -> list[np.ndarray]:
        request = pipe.request([1, 2, 3], [], [], voice, torch.Generator().manual_seed(5))
        try:
            return list(request.stream(tokens=SPEECH))
        finally:
            request.close()

    pipe.prompt_state = None
    computed = streamed()
    assert pipe.prompt_state is not None and pipe.prompt_state[0] is voice.tensors["speech_tokens"]
    reused = streamed()
    pipe.prompt_state = None
    rt.model.warm_voice(voice)  # what prepare_voice does
    assert pipe.prompt_state[0] is voice.tensors["speech_tokens"]
    again = streamed()
    assert len(computed) == len(reused) == len(again) > 1
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(computed, reused, again))
