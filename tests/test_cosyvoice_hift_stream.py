"""Our CosyVoice2 streamed vocoding (edge_runtime.models.cosyvoice.hift_stream) against the reference.

The parity tests (slow) run the reference as a subprocess in its scratch venv and skip when it is
missing; the rest use a small HiFT built here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_support import SCRIPTS, _run, require_reference, run_reference
from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import hift as H
from edge_runtime.models.cosyvoice.hift_stream import MEL_CACHE_FRAMES, HiFTStream, vocode
from test_cosyvoice_hift import voiced_copy

# Upstream's streaming schedule (CosyVoice2Model.tts): hop 25 tokens, the first one padded so the
# prompt plus the hop is a multiple of 25, 3 lookahead tokens, 2 mel frames per token.
HOP, LOOKAHEAD, MEL_PER_TOKEN = 25, 3, 2
PROMPT_TOKENS = 13  # not a multiple of 25: first hop 25 + 12
SPEECH_TOKENS = 100  # hops 37, 25, 25, then a final chunk
SEED = 7


def hop_offsets(prompt_tokens: int, speech_tokens: int) -> list[int]:
    """token_offset of each of upstream's token2wav calls; the last call is the final one."""
    pad = -prompt_tokens % HOP
    offsets = [0]
    while True:
        hop = HOP + pad if offsets[-1] == 0 else HOP
        if speech_tokens - offsets[-1] < hop + LOOKAHEAD:
            return offsets
        offsets.append(offsets[-1] + hop)


@pytest.fixture(scope="module")
def voiced_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return voiced_copy(tmp_path_factory)


@pytest.mark.slow
def test_stream_matches_reference_chunks(voiced_dir: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    request = {"stages": ["stream"], "seed": SEED,
               "prompt_speech_tokens": torch.randint(0, 6561, (PROMPT_TOKENS,), generator=g).tolist(),
               "speech_tokens": torch.randint(0, 6561, (SPEECH_TOKENS,), generator=g).tolist()}
    ref = run_reference(voiced_dir, request, tmp_path / "out.npz")
    offsets = hop_offsets(PROMPT_TOKENS, SPEECH_TOKENS)
    assert offsets == [0, 37, 62, 87]
    assert sorted(k for k in ref if k.startswith("stream_wav_")) == [f"stream_wav_{k}" for k in range(len(offsets))]

    torch.set_num_threads(1)
    hift = H.load(voiced_dir)
    stream = HiFTStream(hift, torch.Generator().manual_seed(SEED))
    rng = torch.get_rng_state()
    chunks, voiced = [], []
    for k, offset in enumerate(offsets):
        # token2wav vocodes the flow's mel from token_offset on (the flow output covers all tokens so far).
        mel = torch.from_numpy(ref[f"stream_mel_{k}"][:, :, offset * MEL_PER_TOKEN:])
        with torch.inference_mode():
            voiced.append((hift.f0(mel) > hift.cfg.nsf_voiced_threshold).float().mean().item())
        wav = stream.push(mel, finalize=k == len(offsets) - 1)
        theirs = ref[f"stream_wav_{k}"]
        diff = np.abs(wav.numpy() - theirs).max()
        print(f"chunk {k}: {mel.shape[2]} new frames, {wav.shape[1]} samples, max |diff| {diff:.3g}")
        assert wav.shape == theirs.shape
        assert diff <= 1e-4
        assert np.abs(theirs).max() > 1e-2  # not a silent comparison
        chunks.append(wav)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    assert all(0.3 < v for v in voiced), voiced  # the harmonic source is exercised
    whole = torch.cat(chunks, dim=1).numpy()
    diff = np.abs(whole - ref["stream_wav"]).max()
    print(f"whole stream: {whole.shape[1]} samples, max |diff| {diff:.3g}")
    assert whole.shape == ref["stream_wav"].shape == (1, SPEECH_TOKENS * MEL_PER_TOKEN * hift.cfg.samples_per_frame)
    assert diff <= 1e-4
    assert stream.nbytes == 0  # finalize dropped the caches


# Upstream's token2wav(finalize=True, speed=...) with the flow replaced by a stub returning a given
# mel, so only its vocoding part runs: argv = scripts dir, model dir, mel .npy, seed, speed, out .npy.
REF_OFFLINE = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import cosyvoice_reference_run as ref
from cosyvoice.cli.model import CosyVoice2Model
from hyperpyyaml import load_hyperpyyaml
model_dir, mel, seed, speed, out = sys.argv[2], np.load(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
ref.SECTIONS = ("hift",)
with open(model_dir + "/cosyvoice2.yaml") as f:
    hift = load_hyperpyyaml(ref.trimmed_yaml(f.read()))["hift"]
hift.load_state_dict(torch.load(model_dir + "/hift.pt", weights_only=True), strict=True)

class GivenMel:
    token_mel_ratio = 2
    def inference(self, **kwargs):
        return torch.from_numpy(mel), None

model = CosyVoice2Model(llm=None, flow=GivenMel(), hift=hift.eval(), fp16=False)
model.hift_cache_dict["u"] = None
torch.manual_seed(seed)
wav = model.token2wav(token=torch.zeros(1, 1, dtype=torch.int32), prompt_token=torch.zeros(1, 0, dtype=torch.int32),
                      prompt_feat=torch.zeros(1, 0, 80), embedding=torch.zeros(1, 192), token_offset=0,
                      uuid="u", finalize=True, speed=speed)
np.save(out, wav.numpy())
"""


@pytest.mark.slow
def test_offline_speed_matches_reference(voiced_dir: Path, tmp_path: Path) -> None:
    py = require_reference()
    mel = torch.randn(1, 80, 61, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "mel.npy", mel.numpy())
    _run([str(py), "-c", REF_OFFLINE, str(SCRIPTS), str(voiced_dir), str(tmp_path / "mel.npy"), "4", "1.25",
          str(tmp_path / "wav.npy")])
    theirs = np.load(tmp_path / "wav.npy")
    torch.set_num_threads(1)
    wav = vocode(H.load(voiced_dir), mel, speed=1.25, generator=torch.Generator().manual_seed(4))
    diff = np.abs(wav.numpy() - theirs).max()
    print(f"speed 1.25: {wav.shape[1]} samples, max |diff| {diff:.3g}")
    assert wav.shape == theirs.shape == (1, int(61 / 1.25) * 480)
    assert diff <= 1e-4
    assert np.abs(theirs).max() > 1e-2


# -- without the reference --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_hift() -> H.HiFTGenerator:
    torch.set_num_threads(1)  # tiny convolutions: threads only add contention on a shared machine
    with torch.random.fork_rng():  # module init draws from the global RNG; keep it as it was
        torch.manual_seed(0)
        model = H.build(H.HiFTConfig(base_channels=32, f0_cond_channels=32))
    return model.eval()


def _mel(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed))


def _stream(hift: H.HiFTGenerator, generator, chunks: list[torch.Tensor]) -> torch.Tensor:
    stream = HiFTStream(hift, generator)
    return torch.cat([stream.push(c, finalize=i == len(chunks) - 1) for i, c in enumerate(chunks)], dim=1)


def test_same_seed_same_audio_global_rng_untouched(small_hift: H.HiFTGenerator) -> None:
    chunks = [_mel(30, 1), _mel(20, 2), _mel(9, 3)]
    rng = torch.get_rng_state()
    a = _stream(small_hift, torch.Generator().manual_seed(5), chunks)
    b = _stream(small_hift, torch.Generator().manual_seed(5), chunks)
    c = _stream(small_hift, torch.Generator().manual_seed(6), chunks)
    assert torch.equal(rng, torch.get_rng_state())
    assert a.shape == (1, 59 * 480)
    assert a.abs().max() > 1e-3
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_injected_draw_sees_whole_chunk(small_hift: H.HiFTGenerator) -> None:
    """A SourceDraw gets each chunk's full excitation length (cached frames included) and, drawing
    from the same generator as the stream would, gives the same audio."""
    chunks = [_mel(30, 1), _mel(20, 2), _mel(9, 3)]
    gen, asked = torch.Generator().manual_seed(5), []

    def draw(batch: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append((batch, samples))
        return small_hift.m_source.draw(batch, samples, gen)

    injected = _stream(small_hift, draw, chunks)
    assert asked == [(1, 30 * 480), (1, (8 + 20) * 480), (1, (8 + 9) * 480)]
    assert torch.equal(injected, _stream(small_hift, torch.Generator().manual_seed(5), chunks))


def test_offline_equals_forward(small_hift: H.HiFTGenerator) -> None:
    mel = _mel(25, 4)
    with torch.inference_mode():
        offline = small_hift(mel, generator=torch.Generator().manual_seed(3))
    assert torch.equal(vocode(small_hift, mel, generator=torch.Generator().manual_seed(3)), offline)


def test_nbytes_and_close(small_hift: H.HiFTGenerator) -> None:
    stream = HiFTStream(small_hift)
    assert stream.nbytes == 0
    out = stream.push(_mel(30, 1))
    assert out.shape == (1, (30 - MEL_CACHE_FRAMES) * 480)
    cache = stream.cache_samples
    assert stream.nbytes == (80 * MEL_CACHE_FRAMES + 2 * cache) * 4  # mel + source + held-back audio, fp32
    stream.close()
    assert stream.nbytes == 0
    with pytest.raises(RuntimeError, match="after the final chunk or close"):
        stream.push(_mel(10, 2))


@pytest.mark.parametrize("mel, kwargs, match", [
    (torch.zeros(80, 30), {}, r"\[1, 80, frames\]"),
    (torch.zeros(2, 80, 30), {}, r"\[1, 80, frames\]"),
    (torch.zeros(1, 40, 30), {}, r"\[1, 80, frames\]"),
    (torch.zeros(1, 80, 30, dtype=torch.long), {}, "floating-point"),
    (torch.zeros(1, 80, 5), {}, "too few"),
    (torch.zeros(1, 80, 0), {"finalize": True}, "too few"),
    (torch.zeros(1, 80, 30), {"speed": 1.5}, "offline only"),
    (torch.zeros(1, 80, 30), {"speed": 0.0, "finalize": True}, "finite number > 0"),
    (torch.zeros(1, 80, 30), {"speed": float("nan"), "finalize": True}, "finite number > 0"),
    (torch.zeros(1, 80, 3), {"speed": 4.0, "finalize": True}, "leaves no audio"),
])
def test_bad_input(small_hift: H.HiFTGenerator, mel: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        HiFTStream(small_hift).push(mel, **kwargs)


def test_speed_after_streaming_started_is_refused(small_hift: H.HiFTGenerator) -> None:
    stream = HiFTStream(small_hift)
    stream.push(_mel(30, 1))
    with pytest.raises(InvalidInputError, match="offline only"):
        stream.push(_mel(10, 2), finalize=True, speed=1.25)
