"""The CosyVoice2 reference side end to end: tiny official-layout folder + reference outputs.

Skipped (with the command that builds it) when the reference venv .cosyvoice_ref is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cosyvoice_support import OFFICIAL_FILES, require_reference, run_reference, tiny_model_dir

pytestmark = pytest.mark.slow

PROMPT_TOKENS = [5, 6, 7, 8, 9, 10]
SPEECH_TOKENS = list(range(100, 160))  # 60 tokens: two streamed chunks (25 + pad, then the rest)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_reference()
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def outputs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {"stages": ["lm_logits", "lm_sample", "flow", "hift", "stream"], "seed": 3,
               "text_ids": [11, 12, 13, 14, 15], "prompt_text_ids": [20, 21],
               "prompt_speech_tokens": PROMPT_TOKENS, "speech_tokens": SPEECH_TOKENS, "noise_seed": 7}
    return run_reference(model_dir, request, tmp_path_factory.mktemp("ref") / "out.npz")


def _plain_yaml(path: Path) -> dict:
    """Read the hyperpyyaml file without executing its tags (as the family will)."""
    class Loader(yaml.SafeLoader):
        pass

    def untagged(loader, suffix, node):
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("!", untagged)
    return yaml.load(path.read_text(), Loader=Loader)


def test_folder_has_official_files(model_dir: Path) -> None:
    for name in OFFICIAL_FILES:
        assert (model_dir / name).is_file(), name
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert total < 20e6, f"tiny folder is {total / 1e6:.1f} MB"
    cfg = _plain_yaml(model_dir / "cosyvoice2.yaml")
    qwen = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    assert cfg["sample_rate"] == 24000 and cfg["token_mel_ratio"] == 2 and cfg["spk_embed_dim"] == 192
    assert cfg["llm_input_size"] == qwen["hidden_size"]
    assert cfg["llm"]["speech_token_size"] == 6561
    assert cfg["flow"]["encoder"]["output_size"] == cfg["flow"]["input_size"]
    assert cfg["hift"]["upsample_rates"] == [8, 5, 3] and cfg["hift"]["istft_params"]["hop_len"] == 4


def test_state_dict_prefixes(model_dir: Path) -> None:
    llm = torch.load(model_dir / "llm.pt", weights_only=True)
    flow = torch.load(model_dir / "flow.pt", weights_only=True)
    hift = torch.load(model_dir / "hift.pt", weights_only=True)
    for sd in (llm, flow, hift):
        assert all(v.dtype == torch.float32 for v in sd.values())
    assert "llm.model.model.layers.0.self_attn.q_proj.weight" in llm
    assert "llm.model.lm_head.weight" in llm
    assert llm["speech_embedding.weight"].shape[0] == 6564 == llm["llm_decoder.weight"].shape[0]
    assert "llm_decoder.bias" in llm and llm["llm_embedding.weight"].shape[0] == 2
    assert flow["input_embedding.weight"].shape[0] == 6561
    assert flow["spk_embed_affine_layer.weight"].shape == (80, 192)
    for part in ("embed", "encoders", "pre_lookahead_layer", "up_layer", "up_embed", "up_encoders", "after_norm"):
        assert any(k.startswith(f"encoder.{part}.") for k in flow), part
    for part in ("time_mlp", "down_blocks", "mid_blocks", "up_blocks", "final_"):
        assert any(k.startswith(f"decoder.estimator.{part}") for k in flow), part
    for part in ("conv_pre", "ups.0", "resblocks.0", "source_downs", "source_resblocks",
                 "m_source.l_linear", "f0_predictor.condnet", "f0_predictor.classifier"):
        assert any(k.startswith(part) for k in hift), part
    assert "conv_pre.parametrizations.weight.original0" in hift  # weight norm, torch >= 2.1 naming


def test_onnx_standins_official_io(model_dir: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    camp = ort.InferenceSession(str(model_dir / "campplus.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in camp.get_inputs()] == ["input"] and camp.get_outputs()[0].name == "output"
    emb = camp.run(None, {"input": np.random.default_rng(0).standard_normal((1, 57, 80)).astype(np.float32)})[0]
    assert emb.shape == (1, 192)
    tok = ort.InferenceSession(str(model_dir / "speech_tokenizer_v2.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in tok.get_inputs()] == ["feats", "feats_length"]
    assert tok.get_outputs()[0].name == "indices"
    for frames in (100, 101, 303):
        feats = np.random.default_rng(frames).standard_normal((1, 128, frames)).astype(np.float32)
        ids = tok.run(None, {"feats": feats, "feats_length": np.array([frames], dtype=np.int32)})[0]
        assert ids.dtype == np.int32 and ids.shape == (1, -(-frames // 4))
        assert ids.min() >= 0 and ids.max() < 6561


def test_reference_outputs_shapes_and_finite(outputs: dict[str, np.ndarray]) -> None:
    for k, v in outputs.items():
        if v.dtype.kind == "f":
            assert np.isfinite(v).all(), k
    n_in = 1 + 2 + 5 + 1 + len(PROMPT_TOKENS)  # sos, prompt text + text, task id, prompt speech
    assert outputs["lm_logits"].shape == (1, n_in, 6564)
    tokens = outputs["lm_tokens"]
    assert 2 * 5 <= len(tokens) <= 20 * 5 and tokens.min() >= 0 and tokens.max() < 6561
    assert outputs["flow_mel"].shape == (1, 80, 2 * len(SPEECH_TOKENS))
    assert outputs["hift_wav"].shape == (1, 480 * 2 * len(SPEECH_TOKENS))
    assert np.abs(outputs["hift_wav"]).max() <= 0.99 + 1e-6  # audio_limit
    chunks = sorted(k for k in outputs if k.startswith("stream_wav_"))
    assert len(chunks) == 2
    assert outputs["stream_wav"].shape == outputs["hift_wav"].shape
    # the final streamed chunk re-runs the flow over all tokens, non-streaming, same noise:
    # upstream gives exactly the offline mel there
    np.testing.assert_array_equal(outputs["stream_mel_1"], outputs["flow_mel"])


def test_reference_is_deterministic(model_dir: Path, outputs: dict[str, np.ndarray], tmp_path: Path) -> None:
    again = run_reference(model_dir, {"stages": ["flow", "hift"], "seed": 3, "noise_seed": 7,
                                      "prompt_speech_tokens": PROMPT_TOKENS, "speech_tokens": SPEECH_TOKENS,
                                      "prompt_feat": outputs["in_prompt_feat"][0].tolist(),
                                      "embedding": outputs["in_embedding"][0].tolist()}, tmp_path / "again.npz")
    np.testing.assert_array_equal(again["flow_mel"], outputs["flow_mel"])
    np.testing.assert_array_equal(again["hift_wav"], outputs["hift_wav"])
