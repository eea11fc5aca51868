"""Our CosyVoice3 language model, its sampler rules and text tokenizer (edge_runtime.models.cosyvoice.llm /
.sampling / .tokenizer) against the upstream fixtures in tests/fixtures/cosyvoice3 (no upstream code runs
here).

The fixture tokens were drawn by upstream's ``CosyVoice3LM.inference`` after ``torch.manual_seed(seed)``,
with its one-step attention mask widened to the whole cache (what the transformers 4 it pins did;
cases.json notes) and ``<|endofprompt|>`` = 300 in the tiny vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.cosyvoice import llm as L
from edge_runtime.models.cosyvoice import sampling as S
from edge_runtime.models.cosyvoice.tokenizer import ADDED_SPECIAL_TOKENS_V3, CosyVoiceTextTokenizer

FIX = Path(__file__).resolve().parent / "fixtures" / "cosyvoice3"
CASES = json.loads((FIX / "cases.json").read_text())
LM = CASES["lm"]


def load_fixture_lm(edits: list[dict] | None = None) -> L.CosyVoice3LM:
    torch.set_num_threads(1)
    cfg = L.LMConfig.from_folder(FIX)
    model = L.build(cfg)
    state = load_file(FIX / "llm.safetensors")
    for e in edits or []:  # cases.json lm.silence.weight_edits: "[:, 0]" or "[[ids...], 0]"
        rows = slice(None) if e["index"] == "[:, 0]" else json.loads(e["index"][1:].split("], 0]")[0] + "]")
        state[e["key"]][rows, 0] = e["set"]
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> L.CosyVoice3LM:
    return load_fixture_lm()


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    return load_file(FIX / "lm_case.safetensors")


def inputs(case) -> tuple[list[int], list[int], list[int]]:
    return case["text_ids"].tolist(), case["prompt_text_ids"].tolist(), case["prompt_speech_tokens"].tolist()


def test_config_from_v3_folder(model: L.CosyVoice3LM) -> None:
    cfg = model.cfg
    assert isinstance(model, L.CosyVoice3LM) and cfg.version == 3
    assert (cfg.speech_token_size, cfg.llm_input_size, cfg.eos, cfg.speech_vocab) == (6561, 32, 6562, 6761)
    assert cfg.endofprompt_id is None  # the 512-token test vocabulary cannot hold 151646
    assert cfg.sampling == S.RASSettings()
    assert model.llm_decoder.bias is None and not hasattr(model, "llm_embedding")
    qwen = model.llm.model
    assert qwen.lm_head.weight is qwen.model.embed_tokens.weight


def test_logits_match_fixture(model: L.CosyVoice3LM, case) -> None:
    embeds = model.input_embeds(*inputs(case))
    assert embeds.shape[1] == LM["lm_input_len"]
    logits = model.logits(embeds)[0]
    diff = (logits - case["logits"]).abs().max().item()
    print(f"logits max |diff| {diff:.3g} (std {case['logits'].std():.3g})")
    assert logits.shape == case["logits"].shape == (21, 6761)
    assert diff <= 1e-4 and case["logits"].std() > 1e-2


@pytest.mark.parametrize("name, seed", [("sampled_tokens", LM["seed"]),
                                        ("sampled_tokens_early_stop", LM["early_stop"]["seed"])])
def test_sampled_tokens_match_fixture(model: L.CosyVoice3LM, case, name: str, seed: int) -> None:
    """The early-stop case ends before min_len on an id > 6561: upstream masks only id 6561 there."""
    cfg = dataclasses.replace(model.cfg, endofprompt_id=LM["endofprompt_id"])  # the check passes: 300 is there
    checked = L.build(cfg)
    checked.load_state_dict(model.state_dict(), strict=True)
    checked.tie_weights()
    state = torch.get_rng_state()
    mine = list(checked.generate(*inputs(case), generator=torch.Generator().manual_seed(seed),
                                 min_tokens=LM["min_len"], max_tokens=LM["max_len"], max_silent_run=None))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    print(f"{name}: {len(mine)} tokens")
    assert mine == case[name].tolist()
    if name == "sampled_tokens_early_stop":
        assert len(mine) < LM["min_len"]


def test_silence_cap_matches_fixture(case) -> None:
    sil = LM["silence"]
    assert sorted(L.SILENT_TOKENS) == sil["silent_tokens"] and L.MAX_SILENT_RUN == sil["max_silent_token_num"]
    lm = load_fixture_lm(sil["weight_edits"])
    args = dict(min_ratio=sil["min_token_text_ratio"], max_ratio=sil["max_token_text_ratio"])
    seeded = lambda: torch.Generator().manual_seed(sil["seed"])  # noqa: E731
    raw = list(lm.generate(*inputs(case), generator=seeded(), max_silent_run=None, **args))
    capped = list(lm.generate(*inputs(case), generator=seeded(), **args))
    print(f"silence: raw {len(raw)} tokens, capped {len(capped)}")
    assert raw == case["sampled_tokens_silence_raw"].tolist()
    assert capped == case["sampled_tokens_silence"].tolist()
    assert len(capped) < len(raw)


def test_closing_the_capped_iterator_frees_the_cache(model: L.CosyVoice3LM, case) -> None:
    made = []
    real = model._new_cache
    model._new_cache = lambda: made.append(real()) or made[-1]
    try:
        it = model.generate(*inputs(case), generator=torch.Generator().manual_seed(0), min_tokens=5, max_tokens=50)
        first = [next(it) for _ in range(3)]
        assert made[0].get_seq_length() > 0
        it.close()
    finally:
        del model._new_cache
    assert len(first) == 3 and made[0].get_seq_length() == 0


def test_endofprompt_is_required_when_known(model: L.CosyVoice3LM, case) -> None:
    cfg = dataclasses.replace(model.cfg, endofprompt_id=301)
    lm = L.build(cfg, device="meta")
    text, prompt_text, speech = inputs(case)
    with pytest.raises(InvalidInputError, match=r"<\|endofprompt\|> \(id 301\)"):
        lm.generate(text, prompt_text, speech, generator=torch.Generator())
    with pytest.raises(InvalidInputError, match="max_silent_run=-1"):
        model.generate(text, prompt_text, speech, generator=torch.Generator(), max_silent_run=-1)


def test_ras_redraw_excludes_the_repeated_token() -> None:
    scores = torch.zeros(40)
    scores[7] = 6.0  # the nucleus is token 7 alone
    g = torch.Generator().manual_seed(0)
    history = [7] * 10
    v3 = [S.ras_sampling(scores, history, g, exclude_repeat=True) for _ in range(200)]
    assert 7 not in v3 and len(set(v3)) > 10
    v2 = [S.ras_sampling(scores, history, g) for _ in range(200)]
    assert 7 in v2  # CosyVoice2's reference re-draws from the full distribution


def test_published_keys_and_shapes_match_manifest(tmp_path: Path) -> None:
    manifest = json.loads((FIX / "manifest.json").read_text())["llm.pt"]
    qwen = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **CASES["published_qwen"]}
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(qwen))
    text = (FIX / "cosyvoice3.yaml").read_text().replace("_size: 32", "_size: 896")
    (tmp_path / "cosyvoice3.yaml").write_text(text)
    cfg = L.LMConfig.from_folder(tmp_path)
    assert cfg.version == 3 and cfg.endofprompt_id == 151646 and cfg.llm_input_size == 896
    lm = L.build(cfg, device="meta")
    mine = {k: list(v.shape) for k, v in lm.state_dict().items()}
    assert list(mine) == list(manifest)
    assert mine == manifest
    n = sum(p.numel() for p in lm.parameters())  # the tied text table counted once
    print(f"published CosyVoice3 LM: {n / 1e6:.1f}M parameters")
    assert 500e6 < n < 512e6, n


def test_folder_version_selection(tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(FIX, both)
    shutil.copy(FIX / "cosyvoice3.yaml", both / "cosyvoice2.yaml")
    assert L.LMConfig.from_folder(both).version == 2  # a cosyvoice2.yaml keeps the CosyVoice2 reading
    assert L.LMConfig.from_folder(both, version=3).version == 3
    with pytest.raises(ModelNotFoundError, match="not a CosyVoice3 model folder: missing .*cosyvoice3.yaml"):
        L.LMConfig.from_folder(tmp_path, version=3)
    with pytest.raises(InvalidInputError, match="version=4: allowed are 2"):
        L.LMConfig.from_folder(FIX, version=4)


# -- text tokenizer -------------------------------------------------------------------------------
def qwen2_layout_vocab(folder: Path) -> Path:
    """A byte-level BPE laid out as Qwen2's: 151643 ordinary tokens, then <|endoftext|>, <|im_start|>,
    <|im_end|> as added tokens 151643-151645 (CosyVoice-BlankEN's layout; no merges needed here)."""
    from tokenizers import pre_tokenizers

    folder.mkdir(parents=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {f"x{i}": i for i in range(len(alphabet), 151643)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    specials = {"151643": "<|endoftext|>", "151644": "<|im_start|>", "151645": "<|im_end|>"}
    added = {k: {"content": v, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False} for k, v in specials.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "added_tokens_decoder": added}))
    return folder


def test_cosyvoice3_tokenizer_ids(tmp_path: Path) -> None:
    """Ids as upstream's CosyVoice3Tokenizer gives them on this layout (checked once against it, with
    the upstream checkout at the fixtures' commit): <|endofprompt|> 151646, as its LM asserts."""
    tok = CosyVoiceTextTokenizer(qwen2_layout_vocab(tmp_path / "blank"), version=3)
    assert len(ADDED_SPECIAL_TOKENS_V3) == 280 and ADDED_SPECIAL_TOKENS_V3[19] == "<|endofsystem|>"
    assert tok.endofprompt_id == L.ENDOFPROMPT_ID == 151646
    assert len(tok) == 151924 <= CASES["published_qwen"]["vocab_size"]  # every id has an embedding row
    assert tok.encode("hi<|endofprompt|>[AA1][iǎng]<|endofsystem|>") == [71, 72, 151646, 151666, 151793, 151663]
    with pytest.raises(InvalidInputError, match="version=4: allowed are 2"):
        CosyVoiceTextTokenizer(tmp_path / "blank", version=4)


def test_load_from_folder(tmp_path: Path, model: L.CosyVoice3LM) -> None:
    shutil.copytree(FIX / "CosyVoice-BlankEN", tmp_path / "CosyVoice-BlankEN")
    shutil.copy(FIX / "cosyvoice3.yaml", tmp_path / "cosyvoice3.yaml")
    torch.save(load_file(FIX / "llm.safetensors"), tmp_path / "llm.pt")
    loaded = L.load(tmp_path)  # strict=True inside
    assert isinstance(loaded, L.CosyVoice3LM) and loaded.cfg == model.cfg
    assert torch.equal(loaded.llm_decoder.weight, model.llm_decoder.weight)
    assert loaded.llm.model.lm_head.weight is loaded.llm.model.model.embed_tokens.weight
