"""Our CosyVoice2 HiFT vocoder (edge_runtime.models.cosyvoice.hift) against the reference package.

The reference runs as a subprocess in its scratch venv (.cosyvoice_ref); the tests skip with the
support module's reason when it is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_support import published_yaml, reference_shapes, require_reference, run_reference, tiny_model_dir
from edge_runtime.models.cosyvoice import hift as H

pytestmark = pytest.mark.slow

FRAMES = 60
SAMPLES = FRAMES * 480


def voiced_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny folder with its F0 head rescaled so most frames are voiced (random weights
    give F0 < 1 Hz everywhere, which would leave the harmonic part of the source untested)."""
    require_reference()
    src = tiny_model_dir(tmp_path_factory)
    dst = tmp_path_factory.mktemp("hift") / "voiced"
    shutil.copytree(src, dst)
    sd = torch.load(dst / "hift.pt", map_location="cpu", weights_only=True)
    sd["f0_predictor.classifier.weight"] = sd["f0_predictor.classifier.weight"] * 2000
    sd["f0_predictor.classifier.bias"] = torch.full_like(sd["f0_predictor.classifier.bias"], 60.0)
    torch.save(sd, dst / "hift.pt")
    return dst


@pytest.fixture(scope="module")
def voiced_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return voiced_copy(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(11)
    return {"mel": torch.randn(1, 80, FRAMES, generator=g).numpy(),
            "hift_phase": torch.rand(1, 9, generator=g).numpy(),
            "hift_noise": torch.randn(1, SAMPLES, 9, generator=g).numpy()}


def _ours(model_dir: Path) -> H.HiFTGenerator:
    torch.set_num_threads(1)
    return H.load(model_dir)


def test_loads_strict_and_voiced(voiced_dir: Path, inputs) -> None:
    model = _ours(voiced_dir)  # strict=True inside
    with torch.inference_mode():
        f0 = model.f0(torch.from_numpy(inputs["mel"]))
    voiced = (f0 > model.cfg.nsf_voiced_threshold).float().mean().item()
    assert 0.3 < voiced < 1.0, voiced  # both voiced and unvoiced frames are exercised


def test_waveform_matches_reference_injected(voiced_dir: Path, inputs, tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", **inputs)
    ref = run_reference(voiced_dir, {"stages": ["hift"], "seed": 3, "inputs_npz": str(tmp_path / "in.npz")},
                        tmp_path / "out.npz")
    assert ref["in_hift_noise"].shape == (1, SAMPLES, 9)
    model = _ours(voiced_dir)
    mel = torch.from_numpy(inputs["mel"])
    phase, noise = torch.from_numpy(inputs["hift_phase"]), torch.from_numpy(inputs["hift_noise"])
    with torch.inference_mode():
        source = model.source(mel, phase=phase, noise=noise)
        wav = model.decode(mel, source)
    assert wav.shape == ref["hift_wav"].shape == (1, SAMPLES)
    src_diff = np.abs(source.numpy() - ref["hift_source"]).max()
    wav_diff = np.abs(wav.numpy() - ref["hift_wav"]).max()
    print(f"max |diff| source {src_diff:.3g} wav {wav_diff:.3g}")
    assert src_diff <= 1e-4
    assert wav_diff <= 1e-4
    assert np.abs(ref["hift_wav"]).max() > 1e-3  # not a silent comparison


def test_generator_matches_reference_seed(voiced_dir: Path, inputs, tmp_path: Path) -> None:
    """A per-call Generator seeded s draws what upstream draws after torch.manual_seed(s)."""
    ref = run_reference(voiced_dir, {"stages": ["hift"], "seed": 5, "mel": inputs["mel"].tolist()},
                        tmp_path / "out.npz")
    model = _ours(voiced_dir)
    state = torch.get_rng_state()
    with torch.inference_mode():
        wav = model(torch.from_numpy(inputs["mel"]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert np.abs(wav.numpy() - ref["hift_wav"]).max() <= 1e-4


def test_legacy_weight_norm_names_load(voiced_dir: Path) -> None:
    sd = torch.load(voiced_dir / "hift.pt", map_location="cpu", weights_only=True)
    legacy = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}
    assert any(k.endswith(".weight_g") for k in legacy)
    model = H.build(H.HiFTConfig.from_yaml(voiced_dir / "cosyvoice2.yaml"))
    model.load_state_dict(legacy, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_published_keys_and_shapes_match_reference(tmp_path: Path) -> None:
    yaml_path = published_yaml(tmp_path)
    theirs = reference_shapes(yaml_path, "hift")
    cfg = H.HiFTConfig.from_yaml(yaml_path)
    assert cfg == H.HiFTConfig()  # the published numbers are the defaults
    ours = H.build(cfg, device="meta")
    mine = {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(mine) == sorted(theirs)
    assert mine == theirs
    n = sum(v.numel() for v in ours.parameters())
    assert 20e6 < n < 21.5e6, n  # ~20.8M as published
