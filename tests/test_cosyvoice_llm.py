"""Our CosyVoice2 language model and RAS sampler (edge_runtime.models.cosyvoice.llm / .sampling)
against the reference package.

The reference runs as a subprocess in its scratch venv (.cosyvoice_ref); the tests that need it
skip with the support module's reason when it is missing.

Token parity needs one correction on the reference side: under transformers 5 its one-step
decoding passes a length-1 attention mask that transformers right-pads with "masked", so every
step after the first attends to the first (sos) position only. The reference is run with that
mask widened to the whole cache, which is how upstream behaved under the transformers 4 it pins;
its own code runs otherwise unchanged. The unchanged reference is also run: its first token
(decided by the prefix forward, which the mask does not affect) must equal ours.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_support import SCRIPTS, _run, require_reference, run_reference, tiny_model_dir
from edge_runtime.errors import InvalidInputError, ModelNotFoundError
from edge_runtime.models.cosyvoice import llm as L
from edge_runtime.models.cosyvoice import sampling as S

pytestmark = pytest.mark.slow

TEXT = [11, 12, 13, 14, 15, 16]
PROMPT_TEXT = [20, 21, 22, 23]
PROMPT_SPEECH = [5, 100, 6560, 3000, 17, 42, 4242]
ENDOFPROMPT = 300  # stands in for <|endofprompt|> (151646) in the tiny 512-token vocabulary


# -- reference runners ---------------------------------------------------------------------------
# Runs cosyvoice_reference_run.run() for a list of {"model_dir", "request"}; argv[3] == "fixed"
# widens the one-step mask to past + current length before calling the reference's own step.
REF_LM = """
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import cosyvoice_reference_run as ref
from cosyvoice.llm.llm import Qwen2Encoder
real_step = Qwen2Encoder.forward_one_step
def step_with_full_mask(self, xs, masks, cache=None):
    kv = xs.shape[1] + (0 if cache is None else cache.get_seq_length())
    return real_step(self, xs, torch.ones(1, 1, kv, dtype=torch.bool), cache)
if sys.argv[3] == "fixed":
    Qwen2Encoder.forward_one_step = step_with_full_mask
out = {}
for i, job in enumerate(json.loads(sys.stdin.read())):
    out |= {f"{i}/{k}": v for k, v in ref.run(job["model_dir"], job["request"]).items()}
np.savez(sys.argv[2], **out)
"""

# Upstream's ras_sampling called repeatedly on one score vector, the decoded list growing as in
# its decoding loop, after torch.manual_seed(seed).
REF_RAS = """
import json, sys, torch
from cosyvoice.utils.common import ras_sampling
job = json.loads(sys.stdin.read())
scores = torch.tensor(job["scores"], dtype=torch.float32)
runs = []
for seed in job["seeds"]:
    torch.manual_seed(seed)
    tokens = []
    for _ in range(job["draws"]):
        tokens.append(int(ras_sampling(scores, tokens, 25, **job["settings"])))
    runs.append(tokens)
print(json.dumps(runs))
"""


def reference_lm(jobs: list[dict], out: Path, fixed_mask: bool) -> list[dict[str, np.ndarray]]:
    py = require_reference()
    _run([str(py), "-c", REF_LM, str(SCRIPTS), str(out), "fixed" if fixed_mask else "asis"], stdin=json.dumps(jobs))
    with np.load(out) as z:
        return [{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}/")} for i in range(len(jobs))]


def request(stages: list[str], text=TEXT, prompt_text=(), prompt_speech=(), **extra) -> dict:
    return {"stages": stages, "text_ids": list(text), "prompt_text_ids": list(prompt_text),
            "prompt_speech_tokens": list(prompt_speech), **extra}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def eos_heavy(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folder with end-of-speech and the task id made likely: decoding then re-draws
    early EOS before the minimum length, drops task ids, and stops soon after the minimum."""
    dst = tmp_path_factory.mktemp("lm") / "eos_heavy"
    shutil.copytree(tiny, dst)
    sd = torch.load(dst / "llm.pt", map_location="cpu", weights_only=True)
    bias = sd["llm_decoder.bias"].clone()
    bias[6561] += 6.0  # eos
    bias[6562] += 4.5  # task id (> eos: dropped)
    sd["llm_decoder.bias"] = bias
    torch.save(sd, dst / "llm.pt")
    return dst


@pytest.fixture(scope="module")
def model(tiny: Path) -> L.CosyVoice2LM:
    torch.set_num_threads(1)
    return L.load(tiny)


def ours(model: L.CosyVoice2LM, req: dict, seed: int) -> list[int]:
    return list(model.generate(req["text_ids"], req["prompt_text_ids"], req["prompt_speech_tokens"],
                               generator=torch.Generator().manual_seed(seed),
                               min_ratio=req.get("min_token_text_ratio", 2.0),
                               max_ratio=req.get("max_token_text_ratio", 20.0)))


# -- logits --------------------------------------------------------------------------------------
def test_zero_shot_logits_match_reference(tiny: Path, model: L.CosyVoice2LM, tmp_path: Path) -> None:
    req = request(["lm_logits", "lm_sample"], prompt_text=PROMPT_TEXT, prompt_speech=PROMPT_SPEECH, seed=4)
    ref = run_reference(tiny, req, tmp_path / "out.npz")
    embeds = model.input_embeds(TEXT, PROMPT_TEXT, PROMPT_SPEECH)
    logits = model.logits(embeds)
    assert logits.shape == ref["lm_logits"].shape == (1, 1 + 10 + 1 + 7, 6564)
    emb_diff = np.abs(embeds.numpy() - ref["lm_input_embeds"]).max()
    diff = np.abs(logits.numpy() - ref["lm_logits"]).max()
    print(f"max |diff| input embeds {emb_diff:.3g} logits {diff:.3g}")
    assert emb_diff <= 1e-6
    assert diff <= 1e-4
    qwen = model.llm.model
    assert qwen.lm_head.weight is qwen.model.embed_tokens.weight  # tied after the strict load: one table
    assert np.abs(ref["lm_logits"]).max() > 0.1 and ref["lm_logits"].std() > 1e-2  # not a trivial signal

    # the unchanged reference (length-1 step mask) agrees on the first token only by construction
    mine, theirs = ours(model, req, 4), ref["lm_tokens"].tolist()
    assert mine[0] == theirs[0]
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    print(f"unchanged reference: {len(theirs)} tokens, first difference at token {first}")


def test_instruct_and_cross_lingual_logits_match_reference(tiny: Path, model: L.CosyVoice2LM, tmp_path: Path) -> None:
    instruct = [30, 31, 32, 33, 34, ENDOFPROMPT]
    cases = {"instruct": (instruct, []), "cross-lingual": ([], [])}
    jobs = [{"model_dir": str(tiny), "request": request(["lm_logits"], prompt_text=pt, prompt_speech=ps)}
            for pt, ps in cases.values()]
    refs = reference_lm(jobs, tmp_path / "out.npz", fixed_mask=False)
    for (name, (pt, ps)), ref in zip(cases.items(), refs):
        logits = model.logits(model.input_embeds(TEXT, pt, ps))
        assert logits.shape == ref["lm_logits"].shape == (1, 1 + len(pt) + len(TEXT) + 1, 6564)
        diff = np.abs(logits.numpy() - ref["lm_logits"]).max()
        print(f"{name}: max |diff| logits {diff:.3g}")
        assert diff <= 1e-4
        assert ref["lm_logits"].std() > 1e-2


# -- sampling: whole decoding runs ---------------------------------------------------------------
RUNS = {
    "zero-shot": ("tiny", request(["lm_sample"], prompt_text=PROMPT_TEXT, prompt_speech=PROMPT_SPEECH, seed=1)),
    "cross-lingual": ("tiny", request(["lm_sample"], seed=2)),
    "instruct": ("tiny", request(["lm_sample"], prompt_text=[30, 31, ENDOFPROMPT], seed=3,
                                 min_token_text_ratio=3.0, max_token_text_ratio=4.0)),
    # 16x..18x the 6 text tokens: a long run, where repetitions force re-draws from the full softmax
    "long": ("tiny", request(["lm_sample"], prompt_speech=PROMPT_SPEECH, seed=7,
                             min_token_text_ratio=16.0, max_token_text_ratio=18.0)),
    "eos-heavy": ("eos_heavy", request(["lm_sample"], prompt_text=PROMPT_TEXT, prompt_speech=PROMPT_SPEECH, seed=5,
                                       min_token_text_ratio=4.0)),
}


@pytest.fixture(scope="module")
def reference_runs(tiny: Path, eos_heavy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    dirs = {"tiny": tiny, "eos_heavy": eos_heavy}
    jobs = [{"model_dir": str(dirs[d]), "request": req} for d, req in RUNS.values()]
    refs = reference_lm(jobs, tmp_path_factory.mktemp("lm") / "runs.npz", fixed_mask=True)
    return {name: ref["lm_tokens"].tolist() for name, ref in zip(RUNS, refs)}


@pytest.mark.parametrize("name", list(RUNS))
def test_generated_tokens_equal_reference(name: str, reference_runs, tiny: Path, eos_heavy: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder, req = RUNS[name]
    lm = L.load(eos_heavy) if folder == "eos_heavy" else L.load(tiny)
    drawn: list[int] = []  # every token ras_sampling returned (re-drawn EOS and dropped ids too)
    full_draws = []
    real_random = S.random_sampling

    def recording_ras(*args, **kwargs):
        drawn.append(S.ras_sampling(*args, **kwargs))
        return drawn[-1]

    def counting_random(*args, **kwargs):
        full_draws.append(1)
        return real_random(*args, **kwargs)

    monkeypatch.setattr(L, "ras_sampling", recording_ras)
    monkeypatch.setattr(S, "random_sampling", counting_random)
    mine, theirs = ours(lm, req, req["seed"]), reference_runs[name]
    eos = 6561
    print(f"{name}: {len(mine)} tokens, {len(full_draws)} repetition re-draws, "
          f"{drawn.count(eos)} eos drawn, {sum(t > eos for t in drawn)} task/fill ids dropped")
    assert mine == theirs
    text_len = len(req["text_ids"])
    assert len(mine) >= int(text_len * req.get("min_token_text_ratio", 2.0)) - sum(t > eos for t in drawn)
    if name == "long":
        assert len(mine) >= 90 and len(full_draws) > 0  # the repetition path really ran
    if name == "eos-heavy":
        assert drawn.count(eos) > 1  # EOS was drawn (and re-drawn) before the minimum length
        assert any(t > eos for t in drawn)  # and a task id was dropped, its input fed again


# -- sampling: the sampler alone, on a nucleus-size boundary -------------------------------------
def boundary_scores() -> torch.Tensor:
    """Scores (25 at 0, 15 at c ~ ln 1/4) whose float32 running total of the sorted probabilities
    reaches top_p = 0.8 within rounding at 23 members (23 / 28.75 = 0.8): upstream's one-at-a-time
    float32 additions and a float64-accumulated cumsum decide different nucleus sizes."""
    cands = (np.float32(np.log(0.25)) + np.arange(-4000, 4001, dtype=np.float32) * np.float32(1e-7)).astype(np.float32)
    scores = torch.zeros(len(cands), 40)
    scores[:, 25:] = torch.from_numpy(cands)[:, None]
    head = scores.softmax(dim=1).sort(dim=1, descending=True, stable=True).values[:, :25]
    sequential = 1 + (np.cumsum(head.numpy(), axis=1)[:, :-1] < 0.8).sum(1)
    wide = 1 + (torch.cumsum(head, dim=1).numpy()[:, :-1] < 0.8).sum(1)
    differ = np.nonzero(sequential != wide)[0]
    assert len(differ) > 0, "no boundary case found near ln(1/4)"
    return scores[differ[0]]


def test_ras_sampling_draws_equal_reference_on_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    py = require_reference()
    scores = boundary_scores()
    settings = dict(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)
    seeds, draws = [0, 1, 2, 3], 200
    job = {"scores": scores.tolist(), "seeds": seeds, "draws": draws, "settings": settings}
    theirs = json.loads(_run([str(py), "-c", REF_RAS], stdin=json.dumps(job)).strip().splitlines()[-1])

    def run_ours() -> list[list[int]]:
        runs = []
        for seed in seeds:
            g, tokens = torch.Generator().manual_seed(seed), []
            for _ in range(draws):
                tokens.append(S.ras_sampling(scores, tokens, g, **settings))
            runs.append(tokens)
        return runs

    state = torch.get_rng_state()
    assert run_ours() == theirs
    assert torch.equal(state, torch.get_rng_state())
    assert len(set(sum(theirs, []))) > 25  # repetitions re-drew from the full distribution too
    # the case is sensitive: running totals accumulated in float64 (torch's CPU cumsum) pick a
    # 23-member nucleus and draw other tokens
    wide = types.SimpleNamespace(cumsum=lambda a: torch.cumsum(torch.from_numpy(a), 0).numpy(),
                                 count_nonzero=np.count_nonzero)
    monkeypatch.setattr(S, "np", wide)
    assert run_ours() != theirs


# -- decoding mechanics --------------------------------------------------------------------------
def test_cached_decoding_equals_full_forward(model: L.CosyVoice2LM) -> None:
    steps: list[torch.Tensor] = []
    real = model._next_logp
    model._next_logp = lambda x, cache: steps.append(real(x, cache)) or steps[-1]
    try:
        tokens = list(model.generate(TEXT, PROMPT_TEXT, PROMPT_SPEECH, generator=torch.Generator().manual_seed(9),
                                     min_tokens=30, max_tokens=30))
    finally:
        del model._next_logp
    assert len(tokens) == len(steps) == 30  # no dropped ids in this run: steps align with tokens
    prefix = model.input_embeds(TEXT, PROMPT_TEXT, PROMPT_SPEECH)
    with torch.inference_mode():
        speech = model.speech_embedding(torch.tensor([tokens]))
    full = model.logits(torch.cat([prefix, speech], dim=1)).log_softmax(dim=-1)[0]
    rows = full[prefix.shape[1] - 1: prefix.shape[1] - 1 + len(steps)]
    diff = (torch.stack(steps) - rows).abs().max().item()
    print(f"max |diff| cached step vs full forward (log-probs, 30 steps): {diff:.3g}")
    assert diff <= 1e-4
    assert rows.std() > 1e-3


def test_global_rng_untouched(model: L.CosyVoice2LM) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tokens = list(model.generate(TEXT, generator=torch.Generator().manual_seed(0)))
    assert len(tokens) > 0
    assert torch.equal(state, torch.get_rng_state())


def test_closing_early_frees_cache(model: L.CosyVoice2LM) -> None:
    made = []
    real = model._new_cache
    model._new_cache = lambda: made.append(real()) or made[-1]
    try:
        it = model.generate(TEXT, PROMPT_TEXT, PROMPT_SPEECH, generator=torch.Generator().manual_seed(0))
        first = [next(it) for _ in range(3)]
        assert made[0].get_seq_length() == 1 + 10 + 1 + 7 + 2  # prefix + the tokens fed back so far
        it.close()
    finally:
        del model._new_cache
    assert len(first) == 3
    assert made[0].get_seq_length() == 0
    assert all(layer.keys is None for layer in made[0].layers)
    ref = weakref.ref(made[0])
    made.clear()
    assert ref() is None  # the closed iterator holds nothing either


# -- published size ------------------------------------------------------------------------------
# Qwen2.5-0.5B's config.json as CosyVoice-BlankEN ships it (transformers 4 format: rope_theta).
PUBLISHED_QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

# The reference's Qwen2LM built on meta from the yaml; its Qwen2Encoder's from_pretrained is
# replaced by construction from the folder's config (no weights file exists).
REF_KEYS = """
import json, sys, types, torch
sys.path.insert(0, sys.argv[1])
import cosyvoice_reference_run as ref
import cosyvoice.llm.llm as upstream
from hyperpyyaml import load_hyperpyyaml
from transformers import Qwen2Config, Qwen2ForCausalLM
upstream.Qwen2ForCausalLM = types.SimpleNamespace(
    from_pretrained=lambda path: Qwen2ForCausalLM(Qwen2Config.from_pretrained(path)))
ref.SECTIONS = ("llm",)
with open(sys.argv[2]) as f:
    text = ref.trimmed_yaml(f.read())
with torch.device("meta"):
    llm = load_hyperpyyaml(text, overrides={"qwen_pretrain_path": sys.argv[3]})["llm"]
print(json.dumps({k: list(v.shape) for k, v in llm.state_dict().items()}))
"""


def published_folder(root: Path) -> Path:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import cosyvoice_testmodel as testmodel
    finally:
        sys.path.remove(str(SCRIPTS))
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    (root / "cosyvoice2.yaml").write_text(testmodel.YAML.format(**testmodel.SIZES["published"]))
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(PUBLISHED_QWEN))
    return root


def test_published_keys_and_shapes_match_reference(tmp_path: Path) -> None:
    py = require_reference()
    folder = published_folder(tmp_path / "published")
    out = _run([str(py), "-c", REF_KEYS, str(SCRIPTS), str(folder / "cosyvoice2.yaml"),
                str(folder / "CosyVoice-BlankEN")])
    theirs = json.loads(out.strip().splitlines()[-1])
    cfg = L.LMConfig.from_folder(folder)
    assert (cfg.speech_token_size, cfg.llm_input_size, cfg.llm_output_size) == (6561, 896, 896)
    assert cfg.sampling == S.RASSettings()  # the published numbers are the defaults
    lm = L.build(cfg, device="meta")
    mine = {k: list(v.shape) for k, v in lm.state_dict().items()}
    assert list(mine) == list(theirs)  # same keys, same order
    assert mine == theirs
    n = sum(p.numel() for p in lm.parameters())  # the tied text embedding / head counted once
    print(f"published LM: {n / 1e6:.1f}M parameters")
    assert 500e6 < n < 512e6, n


# -- bad input (no reference needed) -------------------------------------------------------------
TINY_QWEN = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100, "tie_word_embeddings": True,
             "rope_theta": 10000.0, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def small() -> L.CosyVoice2LM:
    torch.manual_seed(0)
    return L.build(L.LMConfig(qwen=TINY_QWEN, llm_input_size=32, llm_output_size=32)).eval()


def test_exact_token_count_and_lengths(small: L.CosyVoice2LM) -> None:
    g = torch.Generator().manual_seed(0)
    assert len(list(small.generate([1, 2, 3], generator=g, min_tokens=12, max_tokens=12))) == 12
    assert list(small.generate([1, 2, 3], generator=g, max_tokens=0)) == []
    assert L.CosyVoice2LM._length(7, 2.0) == 14 and L.CosyVoice2LM._length(3, 0.5) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(text_ids=[1, 100]), r"text_ids: ids must lie in \[0, 99\], got values from 1 to 100"),
    (dict(text_ids=[]), "text_ids is empty"),
    (dict(text_ids=[1.5]), "text_ids: token ids must be integers"),
    (dict(text_ids=[[1, 2], [3, 4]]), r"text_ids: expected a 1-D list"),
    (dict(prompt_text_ids=[-1]), "prompt_text_ids: ids must lie in"),
    (dict(prompt_speech_tokens=[6561]), r"prompt_speech_tokens: ids must lie in \[0, 6560\]"),
    (dict(generator=None), "generator: expected a torch.Generator"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens=5 exceeds max_tokens=4"),
    (dict(max_tokens=-1), "max_tokens=-1: expected an integer >= 0"),
    (dict(min_ratio=float("nan")), "min_ratio=nan"),
])
def test_bad_input_is_reported(small: L.CosyVoice2LM, kwargs: dict, match: str) -> None:
    args = dict(text_ids=[1, 2], prompt_text_ids=[], prompt_speech_tokens=[], generator=torch.Generator())
    args.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        small.generate(args.pop("text_ids"), args.pop("prompt_text_ids"), args.pop("prompt_speech_tokens"), **args)


def test_bad_folder_is_reported(tmp_path: Path) -> None:
    folder = published_folder(tmp_path / "m")
    yaml_path = folder / "cosyvoice2.yaml"
    text = yaml_path.read_text()
    yaml_path.write_text(text.replace("top_k: 25", "top_k: 0"))
    with pytest.raises(InvalidInputError, match=r"top_k=0 \(allowed: an integer >= 1\)"):
        L.LMConfig.from_folder(folder)
    yaml_path.write_text(text.replace("llm_input_size: 896", "llm_input_size: 512"))
    with pytest.raises(InvalidInputError, match="llm_input_size 512 .* must both equal hidden_size 896"):
        L.LMConfig.from_folder(folder)
    with pytest.raises(ModelNotFoundError, match="missing .*config.json"):
        L.LMConfig.from_folder(tmp_path)
