"""Our CosyVoice3 causal HiFT and its stream (edge_runtime.models.cosyvoice.hift_causal{,_stream}) against
the upstream fixtures in tests/fixtures/cosyvoice3 (made by scripts/cosyvoice3_fixtures.py; no upstream
code runs here).

The fixtures' upstream vocoder had its fixed source-noise buffers replaced (cases.json hift.source_buffers):
the noise is ``torch.rand(1, S, 9)`` from a generator seeded ``source_seed + 1``, drawn on its own, so it
is fed here through ``SourceNoise(..., initial_draw=False)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import hift_causal as C
from edge_runtime.models.cosyvoice import yaml_config
from edge_runtime.models.cosyvoice.hift_causal_stream import CausalHiFTStream, vocode

FIX = Path(__file__).resolve().parent / "fixtures" / "cosyvoice3"
CASES = json.loads((FIX / "cases.json").read_text())
SPF = 480  # samples per mel frame


@pytest.fixture(scope="module")
def model() -> C.CausalHiFTGenerator:
    torch.set_num_threads(1)
    m = C.build(C.CausalHiFTConfig.from_yaml(FIX / "cosyvoice3.yaml"))
    m.load_state_dict(load_file(FIX / "hift.safetensors"), strict=True)
    return m.eval()


def fixture_noise(model: C.CausalHiFTGenerator) -> C.SourceNoise:
    return C.SourceNoise(model.m_source.harmonics, torch.Generator().manual_seed(CASES["hift"]["source_seed"] + 1),
                         initial_draw=False)


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(FIX / "hift_case.safetensors")


@pytest.fixture(scope="module")
def e2e() -> dict[str, torch.Tensor]:
    return load_file(FIX / "e2e_case.safetensors")


def test_config_and_noise_recipe(model: C.CausalHiFTGenerator, case) -> None:
    cfg = model.cfg
    assert (cfg.base_channels, cfg.f0_cond_channels, cfg.conv_pre_look_right) == (32, 32, 4)
    assert model.lookahead == 8 and model.left_context() == 29
    head = case["source_sine_waves_head"]
    assert torch.equal(fixture_noise(model).take(head.shape[1]), head)


def test_offline_matches_fixture(model: C.CausalHiFTGenerator, case) -> None:
    mel = case["mel"]
    state = torch.get_rng_state()
    with torch.inference_mode():
        f0 = model.f0(mel)
        wav = model(mel, noise=fixture_noise(model).take(mel.shape[2] * SPF))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    voiced = (f0 > model.cfg.nsf_voiced_threshold).float().mean().item()
    assert abs(voiced - CASES["hift"]["voiced_fraction"]) < 1e-3  # both voiced and unvoiced frames
    diff = (wav - case["wav"]).abs().max().item()
    print(f"offline max |diff| {diff:.3g} (peak {case['wav'].abs().max():.3g})")
    assert wav.shape == case["wav"].shape and diff <= 1e-4
    assert case["wav"].abs().max() > 1e-2


def test_upstream_calls_and_stream_match_fixture_chunks(model: C.CausalHiFTGenerator, case) -> None:
    """Upstream's streaming calls (whole mel so far, finalize False until the last) and our incremental
    stream release the same samples, chunk for chunk."""
    mel, plan = case["mel"], CASES["hift"]["stream"]
    stream = CausalHiFTStream(model, fixture_noise(model))
    offset = done = 0
    for k, step in enumerate(plan):
        end, fin = step["mel_frames"][1], step["finalize"]
        ref = case[f"stream_chunk_{k}"]
        with torch.inference_mode():
            whole = model(mel[:, :, :end], fin, noise=fixture_noise(model).take((end - (0 if fin else 3)) * SPF))
        call = whole[:, offset:]
        chunk = stream.push(mel[:, :, done:end], finalize=fin)
        assert call.shape == chunk.shape == ref.shape == (1, step["samples"][1] - step["samples"][0])
        d_call, d_chunk = (call - ref).abs().max().item(), (chunk - ref).abs().max().item()
        print(f"chunk {k}: upstream-style call {d_call:.3g}, stream {d_chunk:.3g}")
        assert d_call <= 1e-4 and d_chunk <= 1e-4
        offset, done = step["samples"][1], end


def test_stream_over_long_mel_matches_e2e_fixture(model: C.CausalHiFTGenerator, e2e) -> None:
    """200 frames streamed in hops of 80/100/20: the windows reach back 29 frames, not to frame 0."""
    plan = CASES["e2e"]["stream_hops"]
    stream = CausalHiFTStream(model, fixture_noise(model))
    for k, step in enumerate(plan):
        chunk = stream.push(e2e[f"stream_mel_{k}"], finalize=step["hift_finalize"])
        ref = e2e[f"stream_wav_{k}"]
        diff = (chunk - ref).abs().max().item()
        print(f"e2e chunk {k}: {chunk.shape[1]} samples, max |diff| {diff:.3g}; held {stream.nbytes} bytes")
        assert chunk.shape == ref.shape and diff <= 1e-4
        if not step["hift_finalize"]:
            assert stream.nbytes < 80 * 1024  # tails only: (29 + 8) mel frames and 29 frames of excitation
    wav = vocode(model, e2e["mel"], generator=fixture_noise(model))
    diff = (wav - e2e["wav"]).abs().max().item()
    print(f"e2e offline max |diff| {diff:.3g}")
    assert diff <= 1e-4


def test_frame_by_frame_stream_equals_offline(model: C.CausalHiFTGenerator, e2e) -> None:
    mel = e2e["mel"][:, :, :40]
    whole = vocode(model, mel, generator=torch.Generator().manual_seed(4))
    stream = CausalHiFTStream(model, torch.Generator().manual_seed(4))
    parts = [stream.push(mel[:, :, t:t + 1], finalize=t == 39) for t in range(40)]
    assert [p.shape[1] for p in parts[:9]] == [0] * 8 + [SPF]  # nothing until 8 frames of look-ahead exist
    assert (torch.cat(parts, dim=1) - whole).abs().max().item() <= 1e-5


def test_left_context_bounds_the_receptive_field(model: C.CausalHiFTGenerator, e2e) -> None:
    """Changing mel and excitation before frame p changes no sample from frame p + left_context() on,
    and the bound is within two frames of the real reach."""
    mel = e2e["mel"][:, :, :80]
    noise = torch.rand(1, 80 * SPF, 9, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        source, _ = model.source(model.f0(mel), noise)
        wav = model.decode(mel, source)
        p = 10
        mel2, source2 = mel.clone(), source.clone()
        mel2[:, :, :p] += 3 * torch.randn(1, 80, p, generator=g)
        source2[:, :, :p * SPF] += torch.randn(1, 1, p * SPF, generator=g)
        changed = ((model.decode(mel2, source2) - wav).abs()[0] > 0).nonzero().flatten()
    last = changed.max().item() / SPF
    reach = model.left_context()
    print(f"last changed sample at frame {last:.2f}: reach {last - p:.2f} frames, bound {reach}")
    assert p + reach - 2 <= last < p + reach


def test_f0_of_a_prefix_is_bit_equal(model: C.CausalHiFTGenerator, e2e) -> None:
    """What the stream relies on: the float64 F0 of a frame does not depend on how much mel follows."""
    mel = e2e["mel"]
    with torch.inference_mode():
        whole = model.f0(mel)
        prefix = model.f0(mel[:, :, :53], finalize=False)
    assert prefix.shape[1] == 50 and torch.equal(prefix, whole[:, :50])


def test_upstream_noise_generator_reproduces_upstream_construction() -> None:
    """Values read from upstream's own hyperpyyaml construction (flow + hift sections, commit ace7c47) of
    the fixture yaml and of the published cosyvoice3.yaml: the source's rand_ini and sine_waves rows 0
    and 100000."""
    ref = {
        "fixture": ([0.7487382888793945, 0.012124240398406982, 0.4976615905761719],
                    [0.47804880142211914, 0.9176587462425232, 0.4379831552505493],
                    [0.4351029396057129, 0.05639547109603882, 0.055316150188446045]),
        "published": ([0.17098891735076904, 0.1653319001197815, 0.14378005266189575],
                      [0.9228259921073914, 0.477447509765625, 0.8270518183708191],
                      [0.2586260437965393, 0.04099726676940918, 0.8616819381713867]),
    }
    yaml = yaml_config.load(FIX / "cosyvoice3.yaml")
    gens = {"fixture": C.upstream_noise_generator(C.CausalHiFTConfig.from_section(yaml["hift"], 24000), yaml["flow"]),
            "published": C.upstream_noise_generator()}
    for name, g in gens.items():
        ini = torch.rand(1, 9, generator=g)[0, 1:4].tolist()
        noise = C.SourceNoise(9, g, initial_draw=False).take(100001)[0]
        assert (ini, noise[0, :3].tolist(), noise[100000, :3].tolist()) == ref[name], name


def test_published_keys_and_shapes_match_manifest() -> None:
    manifest = json.loads((FIX / "manifest.json").read_text())["hift.pt"]
    cfg = C.CausalHiFTConfig()
    m = C.build(cfg, device="meta")
    mine = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert list(mine) == list(manifest)
    assert mine == manifest
    assert m.left_context() == 29 and m.lookahead == 8
    n = sum(p.numel() for p in m.parameters())
    assert 20e6 < n < 21.5e6, n  # ~20.8M as published


def test_legacy_weight_norm_names_load(model: C.CausalHiFTGenerator) -> None:
    sd = load_file(FIX / "hift.safetensors")
    legacy = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}
    m = C.build(model.cfg)
    m.load_state_dict(legacy, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bad_input_is_reported(model: C.CausalHiFTGenerator) -> None:
    stream = CausalHiFTStream(model)
    with pytest.raises(InvalidInputError, match=r"mel: got \[1, 40, 5\]"):
        stream.push(torch.zeros(1, 40, 5))
    with pytest.raises(InvalidInputError, match="speed: 1.5 is offline only"):
        stream.push(torch.zeros(1, 80, 5), speed=1.5)
    with pytest.raises(InvalidInputError, match="received no frames"):
        CausalHiFTStream(model).push(torch.zeros(1, 80, 0), finalize=True)
    done = CausalHiFTStream(model)
    assert done.push(torch.zeros(1, 80, 3), finalize=True).shape == (1, 3 * SPF)
    assert done.nbytes == 0
    with pytest.raises(RuntimeError, match="push after the final chunk"):
        done.push(torch.zeros(1, 80, 3))
    with pytest.raises(InvalidInputError, match=r"noise: got \[1, 10, 9\]"):
        model.source(torch.zeros(1, 2), torch.zeros(1, 10, 9))
    with pytest.raises(InvalidInputError, match="conv_pre_look_right: -1 is not allowed"):
        C.CausalHiFTConfig.from_section({"conv_pre_look_right": -1})
    slow = vocode(model, torch.zeros(1, 80, 10), speed=0.5)
    assert slow.shape == (1, 20 * SPF)


def test_load_from_folder(tmp_path: Path, model: C.CausalHiFTGenerator) -> None:
    (tmp_path / "cosyvoice3.yaml").write_text((FIX / "cosyvoice3.yaml").read_text())
    torch.save(load_file(FIX / "hift.safetensors"), tmp_path / "hift.pt")
    loaded = C.load(tmp_path)  # strict=True inside
    assert loaded.cfg == model.cfg and not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
