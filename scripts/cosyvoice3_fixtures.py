"""Generate the CosyVoice3 parity fixtures (tests/fixtures/cosyvoice3/) from upstream's own code.

How to regenerate: check out upstream FunAudioLLM/CosyVoice (Apache-2.0) somewhere, e.g.
    mkdir -p /work/cosyvoice_upstream && git --git-dir=MIRROR archive HEAD | tar -x -C /work/cosyvoice_upstream
then, with the reference venv built by scripts/cosyvoice_reference.sh,
    .cosyvoice_ref/bin/python scripts/cosyvoice3_fixtures.py /work/cosyvoice_upstream \
        [--out tests/fixtures/cosyvoice3] [--upstream-commit SHA]
It takes about a minute on one CPU thread and rewrites every file in --out. The outputs are
deterministic for a given torch/transformers version (the seeds are in cases.json); commit them.

What it does: writes a tiny cosyvoice3.yaml in upstream's format, builds upstream's CosyVoice3LM
(random tiny Qwen2 backbone), CausalMaskedDiffWithDiT (tiny DiT) and CausalHiFTGenerator (tiny)
from it with hyperpyyaml exactly as upstream loads its folder (qwen_pretrain_path overridden),
saves their state dicts, then records what upstream's own inference entry points produce:
    lm_case     CosyVoice3LM.inference() tokens (and logits of one full forward of its LM input);
                CosyVoice3Model.llm_job() for the silent-token cap
    flow_case   CausalMaskedDiffWithDiT.inference() non-streamed, and the per-chunk mels of
                CosyVoice3Model.tts(stream=True)
    hift_case   CausalHiFTGenerator.inference() on a random mel, whole and in CV3's re-vocoding
                chunks
    e2e_case    CosyVoice3Model.tts(): tokens -> flow mel -> HiFT wav, non-streamed and streamed
    manifest    key -> shape of llm.pt / flow.pt / hift.pt at the PUBLISHED config (meta device)
Fixed noise that upstream keeps in plain attributes (the CFM's rand_noise, the causal NSF
source's rand_ini / sine_waves / uv) is replaced by seeded tensors that are saved (or whose
generator recipe is recorded) so that a native implementation can be fed the same values.
Every deviation from running upstream untouched is listed in cases.json "notes".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from cosyvoice_reference_run import trimmed_yaml  # noqa: E402  (same folder; keeps llm/flow/hift)

SPEECH_TOKENS = 6561
ENDOFPROMPT = 300  # stands in for <|endofprompt|> (151646, asserted upstream) in the 512-token vocab
SILENT_TOKENS = [1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323]  # CosyVoice3Model.silent_tokens
SAMPLES_PER_FRAME = 480  # 8 * 5 * 3 upsampling * iSTFT hop 4 at 24 kHz

# The tiny model. Same structure and fixed sizes as the published one (80 mels, 192-d speaker,
# 6561 speech tokens + 200 special ids, 25 Hz tokens, 2 mel frames per token, 480 samples per
# frame); few and narrow layers. heads * dim_head == dim as in the published DiT (16 * 64 = 1024).
TINY = dict(
    llm_size=32, qwen_layers=2, qwen_heads=4, qwen_kv_heads=2, qwen_ffn=64, qwen_vocab=512,
    lookahead_channels=32, dit_dim=64, dit_depth=2, dit_heads=4, dit_dim_head=16, dit_ff_mult=2,
    hift_channels=32, f0_cond_channels=32,
)

# Qwen2.5-0.5B (what Fun-CosyVoice3-0.5B-2512's CosyVoice-BlankEN/config.json describes).
PUBLISHED_QWEN = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
    hidden_act="silu",
)

# Upstream's examples/libritts/cosyvoice3/conf/cosyvoice3.yaml, inference sections only, with the
# sizes as {placeholders}.
TINY_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 24000
llm_input_size: {llm_size}
llm_output_size: {llm_size}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

# model params
llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {lookahead_channels}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_dim_head}
            ff_mult: {dit_ff_mult}
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_cond_channels}
"""

# Every seed and size of the cases (all written to cases.json).
QWEN_INIT_SEED = 0          # torch.manual_seed before the tiny Qwen2ForCausalLM(config)
# Tiny F0 classifier: random init gives f0 = |w.x + b| ~ 0.1 everywhere (w.x ~ -0.08 +- 0.025),
# all below upstream's 10 Hz voiced threshold. weight *= F0_GAIN and bias := F0_GAIN * F0_SHIFT
# centre it near 0 and spread it to about +-100 Hz, so voiced and unvoiced frames both occur.
F0_GAIN, F0_SHIFT = 1500.0, 0.08
LM = dict(seed=14, early_stop_seed=1234, min_token_text_ratio=2, max_token_text_ratio=5,
          text_ids=[11, 12, 13, 14, 15, 16], prompt_text_ids=[20, 21, ENDOFPROMPT, 22, 23, 24],
          prompt_speech_tokens=[5, 100, 6560, 3000, 17, 42, 4242])
LM_SILENCE = dict(seed=77, residual_dim0=3.0, decoder_gain=4.0)
FLOW = dict(inputs_seed=2025, noise_seed=7, prompt_tokens=10, tokens=200)
HIFT = dict(inputs_seed=2026, seed=3, source_seed=11, frames=24, stream_frames=[10, 17, 24],
            source_samples=240000)
SOURCE_CHECK_SAMPLES = 2400  # first samples of the source buffers saved in hift_case
E2E = dict(inputs_seed=2027, noise_seed=8, hift_seed=3, prompt_tokens=10, tokens=100)


# -- importing upstream ----------------------------------------------------------------------------
def import_upstream(upstream: Path) -> dict:
    """Import upstream's modules from the checkout, ahead of the ref venv's CosyVoice2-era copy."""
    # torchaudio: imported at module level by file_utils, onnx.py and DiT/modules.py, used only by
    # feature extraction that the fixtures do not run. The ref venv's sitecustomize stubs it
    # (scripts/cosyvoice_reference.sh); elsewhere a minimal stub is put in place here.
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
    except Exception:
        import importlib.machinery

        def module(name, pkg):
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=pkg)
            if pkg:
                m.__path__ = []
            return m

        stub, comp, kaldi = module("torchaudio", True), module("torchaudio.compliance", True), \
            module("torchaudio.compliance.kaldi", False)
        stub.compliance, comp.kaldi = comp, kaldi
        sys.modules.update({"torchaudio": stub, "torchaudio.compliance": comp,
                            "torchaudio.compliance.kaldi": kaldi})
    for name in [n for n in sys.modules if n == "cosyvoice" or n.startswith("cosyvoice.")]:
        del sys.modules[name]
    sys.path.insert(0, str(upstream))
    import cosyvoice
    assert Path(cosyvoice.__file__).resolve().is_relative_to(upstream.resolve()), cosyvoice.__file__
    from cosyvoice.cli import model as model_mod
    from cosyvoice.llm import llm as llm_mod
    logging.getLogger().setLevel(logging.WARNING)  # file_utils sets DEBUG on the root logger
    return {"llm": llm_mod, "model": model_mod}


def patch_endofprompt(llm_mod) -> None:
    """Qwen2LM.inference asserts `151646 in text` (<|endofprompt|>) for CosyVoice3LM; the tiny
    512-token vocabulary cannot hold that id. Recompile upstream's own inference source with the
    literal replaced by ENDOFPROMPT (one substitution, nothing else changes)."""
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(llm_mod.Qwen2LM.inference))
    assert src.count("151646 in text") == 1, "upstream's <|endofprompt|> assert changed"
    src = src.replace("151646 in text", f"{ENDOFPROMPT} in text")
    scope: dict = {}
    exec(compile(src, inspect.getsourcefile(llm_mod.Qwen2LM), "exec"), llm_mod.__dict__, scope)
    llm_mod.Qwen2LM.inference = scope["inference"]


def upstream_commit(upstream: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(upstream), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --upstream-commit)"


def file_hashes(upstream: Path) -> dict:
    files = ["cosyvoice/llm/llm.py", "cosyvoice/flow/flow.py", "cosyvoice/flow/flow_matching.py",
             "cosyvoice/flow/DiT/dit.py", "cosyvoice/flow/DiT/modules.py",
             "cosyvoice/hifigan/generator.py", "cosyvoice/hifigan/f0_predictor.py",
             "cosyvoice/transformer/convolution.py", "cosyvoice/transformer/upsample_encoder.py",
             "cosyvoice/utils/common.py", "cosyvoice/utils/mask.py", "cosyvoice/cli/model.py",
             "examples/libritts/cosyvoice3/conf/cosyvoice3.yaml"]
    return {f: hashlib.sha256((upstream / f).read_bytes()).hexdigest()[:16] for f in files}


# -- building --------------------------------------------------------------------------------------
def qwen_config(**kw):
    from transformers import Qwen2Config
    return Qwen2Config(**kw)


def build_tiny(out: Path, workdir: Path) -> dict:
    """Write the tiny yaml + Qwen2 config and build the three modules as upstream loads a folder."""
    from hyperpyyaml import load_hyperpyyaml
    from transformers import Qwen2ForCausalLM

    yaml_text = TINY_YAML.format(**TINY)
    (out / "cosyvoice3.yaml").write_text(yaml_text)
    cfg = qwen_config(vocab_size=TINY["qwen_vocab"], hidden_size=TINY["llm_size"],
                      intermediate_size=TINY["qwen_ffn"], num_hidden_layers=TINY["qwen_layers"],
                      num_attention_heads=TINY["qwen_heads"], num_key_value_heads=TINY["qwen_kv_heads"],
                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu")
    # Upstream's Qwen2Encoder calls from_pretrained: give it a saved random tiny model.
    torch.manual_seed(QWEN_INIT_SEED)
    blank = workdir / "CosyVoice-BlankEN"
    Qwen2ForCausalLM(cfg).float().save_pretrained(blank)
    (out / "CosyVoice-BlankEN").mkdir(exist_ok=True)
    shutil.copy(blank / "config.json", out / "CosyVoice-BlankEN" / "config.json")

    conf = load_hyperpyyaml(yaml_text, overrides={"qwen_pretrain_path": str(blank)})
    mods = {k: conf[k].float().eval() for k in ("llm", "flow", "hift")}
    with torch.no_grad():  # see F0_GAIN
        mods["hift"].f0_predictor.classifier.weight.mul_(F0_GAIN)
        mods["hift"].f0_predictor.classifier.bias.fill_(F0_GAIN * F0_SHIFT)
    return mods


def state_dicts(mods: dict) -> dict:
    """Contiguous fp32 copies (tied Qwen embeddings become two tensors, as torch.save keeps both keys)."""
    return {k: {n: t.detach().to(torch.float32).contiguous().clone() for n, t in m.state_dict().items()}
            for k, m in mods.items()}


def published_manifest(upstream: Path, llm_mod, workdir: Path) -> dict:
    """Key -> shape of llm.pt/flow.pt/hift.pt: upstream's modules built on the meta device from
    upstream's cosyvoice3.yaml and the Qwen2.5-0.5B config."""
    from hyperpyyaml import load_hyperpyyaml
    from transformers import Qwen2Config, Qwen2ForCausalLM

    blank = workdir / "published-BlankEN"
    qwen_config(**PUBLISHED_QWEN).save_pretrained(blank)

    class FromConfig:  # from_pretrained without weights: the layout only
        @staticmethod
        def from_pretrained(path):
            return Qwen2ForCausalLM(Qwen2Config.from_pretrained(path))

    text = trimmed_yaml((upstream / "examples/libritts/cosyvoice3/conf/cosyvoice3.yaml").read_text())
    real = llm_mod.Qwen2ForCausalLM
    llm_mod.Qwen2ForCausalLM = FromConfig
    try:
        with torch.device("meta"):
            conf = load_hyperpyyaml(text, overrides={"qwen_pretrain_path": str(blank)})
    finally:
        llm_mod.Qwen2ForCausalLM = real
    return {f"{k}.pt": {n: list(t.shape) for n, t in conf[k].state_dict().items()}
            for k in ("llm", "flow", "hift")}


# -- injected fixed noise -------------------------------------------------------------------------
def source_buffers(seed: int, samples: int) -> dict:
    """The causal NSF source's fixed random tensors (upstream draws them with torch.rand at
    construction: rand_ini [1,9] with column 0 zeroed, sine_waves [1,S,9], uv [1,S,1]). Here each
    comes from its own generator (seed, seed + 1, seed + 2); torch.rand on CPU is prefix-stable,
    so a smaller S gives a prefix of the same values."""
    def rand(*shape, offset):
        return torch.rand(*shape, generator=torch.Generator().manual_seed(seed + offset))

    rand_ini = rand(1, 9, offset=0)
    rand_ini[:, 0] = 0
    return {"rand_ini": rand_ini, "sine_waves": rand(1, samples, 9, offset=1), "uv": rand(1, samples, 1, offset=2)}


def set_source_buffers(hift, bufs: dict) -> None:
    hift.m_source.l_sin_gen.rand_ini = bufs["rand_ini"].clone()
    hift.m_source.l_sin_gen.sine_waves = bufs["sine_waves"]
    hift.m_source.uv = bufs["uv"]


def flow_noise(seed: int, frames: int) -> torch.Tensor:
    """Replaces CausalConditionalCFM.rand_noise (upstream: randn(1, 80, 15000) after seed(0) at
    construction); each call uses its first mel-length frames."""
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed))


# -- observing upstream's calls --------------------------------------------------------------------
@contextlib.contextmanager
def spy(obj, name: str, record: list, before=None):
    """Wrap obj.<name> (called by upstream with keyword arguments) to record inputs and outputs."""
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if before is not None:
            before(kwargs)
        out = real(*args, **kwargs)
        record.append({"kwargs": kwargs, "out": out})
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


def widened_one_step(encoder):
    """Upstream's Qwen2Encoder.forward_one_step passes masks[:, -1, :] as the attention mask. After
    the first step that is a length-1 mask for a longer cache; transformers 5 pads it with "masked",
    so later steps would see the first position only. This runs upstream's own step with the mask
    widened to past + current length (what transformers 4, which upstream pins, did)."""
    real = type(encoder).forward_one_step

    def step(xs, masks, cache=None):
        kv = xs.shape[1] + (0 if cache is None else cache.get_seq_length())
        return real(encoder, xs, torch.ones(1, 1, kv, dtype=torch.bool, device=xs.device), cache)

    return step


# -- cases -----------------------------------------------------------------------------------------
def ids(values) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.int32)  # [1, N] int32, as upstream's frontend


def lm_inference(llm, case: dict, seed: int, record_lm_input: list | None = None) -> tuple[list, list]:
    """Upstream's CosyVoice3LM.inference() under torch.manual_seed(seed); returns (tokens, draws)
    where draws are every id the sampler returned (the last one is the stop id when it stopped)."""
    draws, real_sampling = [], llm.sampling

    def sampling(*a, **k):
        top = real_sampling(*a, **k)
        draws.append(int(top))
        return top

    llm.sampling = sampling
    real_wrapper = llm.inference_wrapper

    def wrapper(lm_input, sampling, min_len, max_len, uuid):
        if record_lm_input is not None:
            record_lm_input.append((lm_input.clone(), min_len, max_len))
        return real_wrapper(lm_input, sampling, min_len, max_len, uuid)

    llm.inference_wrapper = wrapper
    try:
        text, ptext, pspeech = ids(case["text_ids"]), ids(case["prompt_text_ids"]), ids(case["prompt_speech_tokens"])
        torch.manual_seed(seed)
        tokens = list(llm.inference(
            text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
            prompt_text=ptext, prompt_text_len=torch.tensor([ptext.shape[1]], dtype=torch.int32),
            prompt_speech_token=pspeech, prompt_speech_token_len=torch.tensor([pspeech.shape[1]], dtype=torch.int32),
            embedding=torch.zeros(0, 192), sampling=25,
            max_token_text_ratio=case["max_token_text_ratio"], min_token_text_ratio=case["min_token_text_ratio"]))
    finally:
        llm.sampling = real_sampling
        del llm.inference_wrapper
    return [int(t) for t in tokens], draws


def full_forward_logits(llm, lm_input: torch.Tensor) -> torch.Tensor:
    """llm_decoder output at every position of one full forward (upstream's Qwen2Encoder.forward)."""
    with torch.inference_mode():
        hidden, _ = llm.llm(lm_input, torch.tensor([lm_input.shape[1]], dtype=torch.int32))
        return llm.llm_decoder(hidden)[0]


def lm_cases(llm, model_mod, hift, flow, notes: list) -> tuple[dict, dict]:
    case = dict(LM)
    encoder = llm.llm
    lm_inputs: list = []

    def run_recording_steps(seed, inputs=None):
        steps: list = []
        hook = llm.llm_decoder.register_forward_hook(lambda m, i, o: steps.append(o.detach().clone()))
        try:
            toks, drawn = lm_inference(llm, case, seed, inputs)
        finally:
            hook.remove()
        return toks, drawn, torch.cat(steps, 0)

    def teacher_forced_diff(lm_input, toks, steps):
        """max |log-prob difference| between the decoding steps and one full forward over
        lm_input + the fed-back tokens (step 0 is the prefix; step i sees tokens[:i])."""
        with torch.inference_mode():
            seq = torch.cat([lm_input, llm.speech_embedding.weight[toks[:-1]][None]], 1)
            forced = full_forward_logits(llm, seq)[lm_input.shape[1] - 1:]
        diff = (forced.log_softmax(-1) - steps[: forced.shape[0]].log_softmax(-1)).abs().amax(-1)
        return float(diff[0]), float(diff[1:].max()) if diff.shape[0] > 1 else 0.0

    # As-is run: upstream's one-step mask under transformers 5.
    asis, _, asis_steps = run_recording_steps(LM["seed"], lm_inputs)
    asis_diff = teacher_forced_diff(lm_inputs[0][0], asis, asis_steps)
    encoder.forward_one_step = widened_one_step(encoder)
    tokens, draws, steps = run_recording_steps(LM["seed"], lm_inputs)
    lm_input, min_len, max_len = lm_inputs[1]
    assert torch.equal(lm_input, lm_inputs[0][0])
    logits = full_forward_logits(llm, lm_input)
    step_diff = teacher_forced_diff(lm_input, tokens, steps)
    stopped = len(draws) > len(tokens)
    notes.append(
        "LM: upstream's Qwen2Encoder.forward_one_step passes masks[:, -1, :], a length-1 attention mask "
        "after the first step although the cache is longer; under transformers 5 those steps do not "
        "match a full causal forward (as-is: prefix step max |dlogp| "
        f"{asis_diff[0]:.1e}, later steps {asis_diff[1]:.1e}; tokens {asis[:6]}...). sampled_tokens* were "
        "produced with that mask widened to past + current length (what transformers 4, which upstream "
        f"pins, did): prefix {step_diff[0]:.1e}, later steps {step_diff[1]:.1e} "
        f"(tokens {tokens[:6]}...).")
    notes.append(
        "LM: sampling_ids(ignore_eos=True) masks only id speech_token_size=6561 (the CV3 sos id); "
        "the CV3 eos is 6562 and every id in 6561..6760 stops decoding, so ids 6562..6760 can stop "
        "before min_len.")
    lm_meta = dict(case, min_len=min_len, max_len=max_len, lm_input_len=int(lm_input.shape[1]),
                   sampled=len(tokens), stopped_by=(draws[-1] if stopped else "max_len"),
                   endofprompt_id=ENDOFPROMPT, sampling="ras_sampling(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)",
                   embedding="zeros(0, 192) (CV3 LM ignores it)",
                   one_step_mask="widened to past + current length for every sampled_tokens* case (notes)",
                   seed_where="torch.manual_seed(seed) immediately before calling llm.inference(...)")
    tensors = {"text_ids": torch.tensor(case["text_ids"]), "prompt_text_ids": torch.tensor(case["prompt_text_ids"]),
               "prompt_speech_tokens": torch.tensor(case["prompt_speech_tokens"]),
               "logits": logits.float().contiguous(), "sampled_tokens": torch.tensor(tokens, dtype=torch.int64)}

    # Same inputs, another seed: a non-eos stop id (>= 6562) drawn before min_len ends decoding.
    early, edraws = lm_inference(llm, case, LM["early_stop_seed"])
    assert len(edraws) > len(early) and len(early) < min_len, "pick another early_stop_seed"
    lm_meta["early_stop"] = dict(seed=LM["early_stop_seed"], sampled=len(early), stopped_by=edraws[-1],
                                 key="sampled_tokens_early_stop")
    tensors["sampled_tokens_early_stop"] = torch.tensor(early, dtype=torch.int64)

    # Silence cap: a weight variant whose residual stream has a constant positive dimension 0
    # that the decoder rows of the silent tokens read; CosyVoice3Model.llm_job applies the cap.
    sd = {k: v.clone() for k, v in llm.state_dict().items()}
    edits = [
        {"key": "llm.model.model.embed_tokens.weight", "index": "[:, 0]", "set": LM_SILENCE["residual_dim0"]},
        {"key": "llm.model.lm_head.weight", "index": "[:, 0]", "set": LM_SILENCE["residual_dim0"]},
        {"key": "speech_embedding.weight", "index": "[:, 0]", "set": LM_SILENCE["residual_dim0"]},
        {"key": "llm_decoder.weight", "index": f"[{SILENT_TOKENS}, 0]", "set": LM_SILENCE["decoder_gain"]},
    ]
    with torch.no_grad():
        llm.llm.model.model.embed_tokens.weight[:, 0] = LM_SILENCE["residual_dim0"]  # tied: lm_head too
        llm.speech_embedding.weight[:, 0] = LM_SILENCE["residual_dim0"]
        llm.llm_decoder.weight[SILENT_TOKENS, 0] = LM_SILENCE["decoder_gain"]
    scase = dict(case, min_token_text_ratio=2, max_token_text_ratio=20)  # llm_job uses the defaults
    raw, sdraws = lm_inference(llm, scase, LM_SILENCE["seed"])
    model = model_mod.CosyVoice3Model(llm, flow, hift)
    model.tts_speech_token_dict["u"], model.llm_end_dict["u"] = [], False
    torch.manual_seed(LM_SILENCE["seed"])
    model.llm_job(ids(case["text_ids"]), ids(case["prompt_text_ids"]), ids(case["prompt_speech_tokens"]),
                  torch.zeros(0, 192), "u")
    capped = [int(t) for t in model.tts_speech_token_dict["u"]]
    llm.load_state_dict(sd)
    assert capped != raw, "the silent-token cap did not trigger; raise LM_SILENCE decoder_gain"
    silent = sum(t in SILENT_TOKENS for t in raw)
    lm_meta["silence"] = dict(
        seed=LM_SILENCE["seed"], weight_edits=edits, min_token_text_ratio=2, max_token_text_ratio=20,
        min_len=int(len(case["text_ids"]) * 2), max_len=int(len(case["text_ids"]) * 20),
        silent_tokens=SILENT_TOKENS, max_silent_token_num=5,
        raw_len=len(raw), capped_len=len(capped), raw_silent=silent,
        stopped_by=(sdraws[-1] if len(sdraws) > len(raw) else "max_len"),
        entry_point="CosyVoice3Model.llm_job (calls llm.inference with default ratios 2/20; drops a "
                    "silent token when more than 5 silent tokens in a row were seen; the dropped "
                    "token is still fed back to the LM)",
        seed_where="torch.manual_seed(seed) immediately before llm_job (and before the raw inference run)")
    tensors["sampled_tokens_silence"] = torch.tensor(capped, dtype=torch.int64)
    tensors["sampled_tokens_silence_raw"] = torch.tensor(raw, dtype=torch.int64)
    return tensors, lm_meta


def flow_inputs(seed: int, prompt: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_tokens": torch.randint(0, SPEECH_TOKENS, (prompt,), generator=g),
            "tokens": torch.randint(0, SPEECH_TOKENS, (n,), generator=g),
            "prompt_feat": torch.randn(1, 2 * prompt, 80, generator=g),
            "embedding": torch.randn(1, 192, generator=g)}


def run_tts(model_mod, mods: dict, inp: dict, stream: bool, hift_seed: int) -> tuple[list, list, list]:
    """Upstream's CosyVoice3Model.tts over given speech tokens (its voice-conversion path: the
    tokens are all available at once, so the streaming schedule is deterministic). Returns the
    yielded wavs and the recorded flow / HiFT calls."""
    model = model_mod.CosyVoice3Model(mods["llm"], mods["flow"], mods["hift"])
    flow_calls, hift_calls = [], []
    with spy(mods["flow"], "inference", flow_calls), \
            spy(mods["hift"], "inference", hift_calls, before=lambda kw: torch.manual_seed(hift_seed)):
        wavs = [o["tts_speech"] for o in model.tts(
            source_speech_token=ids(inp["tokens"].tolist()),
            flow_prompt_speech_token=ids(inp["prompt_tokens"].tolist()),
            prompt_speech_feat=inp["prompt_feat"], flow_embedding=inp["embedding"], stream=stream)]
    return wavs, flow_calls, hift_calls


def stream_schedule(flow_calls: list, hift_calls: list, wavs: list) -> list:
    """Per chunk: the tokens given to the flow, the token offset token2wav cut at, the flags, the
    new mel frames (of the non-prompt mel) and the wav samples emitted."""
    hops, offset_samples, offset_frames = [], 0, 0
    for i, (fc, hc, wav) in enumerate(zip(flow_calls, hift_calls, wavs)):
        kw = fc["kwargs"]
        mel = fc["out"][0]
        n_tok = int(kw["token"].shape[1])
        new_frames = mel.shape[2] - offset_frames if i else mel.shape[2]
        token_offset = offset_frames // 2
        hop = dict(chunk=i, tokens=[0, n_tok], token_offset=token_offset, streaming=bool(kw["streaming"]),
                   finalize=bool(kw["finalize"]), flow_mel_frames=int(mel.shape[2]),
                   new_mel_frames=[offset_frames, offset_frames + new_frames],
                   hift_mel_frames=int(hc["kwargs"]["speech_feat"].shape[2]),
                   hift_finalize=bool(hc["kwargs"]["finalize"]), hift_out_samples=int(hc["out"][0].shape[1]),
                   samples=[offset_samples, offset_samples + int(wav.shape[1])])
        hops.append(hop)
        offset_frames += new_frames
        offset_samples += int(wav.shape[1])
    return hops


def flow_case(model_mod, mods: dict) -> tuple[dict, dict]:
    flow = mods["flow"]
    inp = flow_inputs(FLOW["inputs_seed"], FLOW["prompt_tokens"], FLOW["tokens"])
    noise = flow_noise(FLOW["noise_seed"], 2 * (FLOW["prompt_tokens"] + FLOW["tokens"]))
    flow.decoder.rand_noise = noise
    tok, ptok = ids(inp["tokens"].tolist()), ids(inp["prompt_tokens"].tolist())
    mel, _ = flow.inference(  # the call token2wav makes when not streaming
        token=tok, token_len=torch.tensor([tok.shape[1]], dtype=torch.int32),
        prompt_token=ptok, prompt_token_len=torch.tensor([ptok.shape[1]], dtype=torch.int32),
        prompt_feat=inp["prompt_feat"], prompt_feat_len=torch.tensor([inp["prompt_feat"].shape[1]], dtype=torch.int32),
        embedding=inp["embedding"], streaming=False, finalize=True)
    wavs, fcalls, hcalls = run_tts(model_mod, mods, inp, stream=True, hift_seed=HIFT["seed"])
    hops = stream_schedule(fcalls, hcalls, wavs)
    tensors = {"tokens": inp["tokens"], "prompt_tokens": inp["prompt_tokens"], "prompt_feat": inp["prompt_feat"],
               "embedding": inp["embedding"], "noise": noise, "mel": mel}
    for i, (fc, hop) in enumerate(zip(fcalls, hops)):
        tensors[f"chunk_{i}"] = fc["out"][0][:, :, hop["token_offset"] * 2:].contiguous()
    meta = dict(FLOW, stream_hops=hops, n_timesteps=10, inference_cfg_rate=0.7, chunk_mask_frames=50,
                nonstream_call="flow.inference(streaming=False, finalize=True)",
                stream_entry_point="CosyVoice3Model.tts(source_speech_token=tokens, stream=True), fresh model "
                                   "instance (token_hop_len starts at 25, x2 per chunk up to 100)",
                noise_where="flow.decoder.rand_noise = noise (each call uses noise[:, :, :mel_len], "
                            "prompt frames included)")
    return tensors, meta


def voiced_fraction(hift, mel: torch.Tensor) -> float:
    """Share of frames whose predicted F0 passes the source's 10 Hz voiced threshold."""
    with torch.inference_mode():
        f0 = hift.f0_predictor.to(torch.float64)(mel.to(torch.float64), finalize=True)
    return round(float((f0 > hift.m_source.l_sin_gen.voiced_threshold).double().mean()), 4)


def hift_case(hift) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(HIFT["inputs_seed"])
    mel = torch.randn(1, 80, HIFT["frames"], generator=g)
    torch.manual_seed(HIFT["seed"])
    wav, _ = hift.inference(speech_feat=mel, finalize=True)
    torch.manual_seed(HIFT["seed"] + 1000)  # the causal source draws nothing at inference
    again, _ = hift.inference(speech_feat=mel, finalize=True)
    assert torch.equal(wav, again), "CausalHiFTGenerator.inference consumed the global RNG"
    tensors = {"mel": mel, "wav": wav.contiguous()}
    # CV3 streaming (CosyVoice3Model.token2wav): HiFT re-vocodes all mel so far, finalize False but
    # for the last chunk, and emits the samples past what it already emitted.
    chunks, emitted = [], 0
    for i, end in enumerate(HIFT["stream_frames"]):
        fin = end == HIFT["frames"]
        torch.manual_seed(HIFT["seed"])
        out, _ = hift.inference(speech_feat=mel[:, :, :end], finalize=fin)
        tensors[f"stream_chunk_{i}"] = out[:, emitted:].contiguous()
        chunks.append(dict(chunk=i, mel_frames=[0, end], finalize=fin, out_samples=int(out.shape[1]),
                           samples=[emitted, int(out.shape[1])]))
        emitted = int(out.shape[1])
    meta = dict(HIFT, stream=chunks, voiced_fraction=voiced_fraction(hift, mel),
                seed_where="torch.manual_seed(seed) immediately before every hift.inference call (no effect: "
                           "the causal NSF source uses its fixed buffers in eval mode)",
                source_buffers="g(k) = torch.Generator().manual_seed(source_seed + k); rand_ini = "
                               "torch.rand(1, 9, generator=g(0)) with rand_ini[:, 0] = 0; sine_waves = "
                               "torch.rand(1, S, 9, generator=g(1)); uv = torch.rand(1, S, 1, generator=g(2)); "
                               "S = source_samples (any S >= the samples used gives the same prefix); "
                               "assigned to m_source.l_sin_gen.rand_ini / .sine_waves and m_source.uv; "
                               "hift_case holds rand_ini and the first 2400 samples of the other two",
                f0_dtype="float64 (upstream casts f0_predictor and the mel to float64)")
    return tensors, meta


def e2e_case(model_mod, mods: dict) -> tuple[dict, dict]:
    inp = flow_inputs(E2E["inputs_seed"], E2E["prompt_tokens"], E2E["tokens"])
    noise = flow_noise(E2E["noise_seed"], 2 * (E2E["prompt_tokens"] + E2E["tokens"]))
    mods["flow"].decoder.rand_noise = noise
    wavs, fcalls, _ = run_tts(model_mod, mods, inp, stream=False, hift_seed=E2E["hift_seed"])
    swavs, sfcalls, shcalls = run_tts(model_mod, mods, inp, stream=True, hift_seed=E2E["hift_seed"])
    hops = stream_schedule(sfcalls, shcalls, swavs)
    tensors = {"tokens": inp["tokens"], "prompt_tokens": inp["prompt_tokens"], "prompt_feat": inp["prompt_feat"],
               "embedding": inp["embedding"], "noise": noise, "mel": fcalls[0]["out"][0], "wav": wavs[0]}
    for i, (fc, hop, w) in enumerate(zip(sfcalls, hops, swavs)):
        tensors[f"stream_mel_{i}"] = fc["out"][0][:, :, hop["token_offset"] * 2:].contiguous()
        tensors[f"stream_wav_{i}"] = w.contiguous()
    meta = dict(E2E, stream_hops=hops, voiced_fraction=voiced_fraction(mods["hift"], tensors["mel"]),
                hift_source="same buffers as hift (hift.source_seed, hift.source_samples)",
                entry_point="CosyVoice3Model.tts(source_speech_token=tokens, stream=False / True), fresh model "
                            "each; torch.manual_seed(hift_seed) before every hift.inference call")
    return tensors, meta


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("upstream", type=Path, help="checkout of FunAudioLLM/CosyVoice")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "cosyvoice3")
    ap.add_argument("--upstream-commit", default=None)
    args = ap.parse_args()
    from safetensors.torch import save_file
    import transformers

    torch.set_num_threads(1)
    up = import_upstream(args.upstream)
    patch_endofprompt(up["llm"])
    args.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mods = build_tiny(args.out, work)
        sds = state_dicts(mods)  # before inference: HiFT.inference casts f0_predictor to float64
        for k, sd in sds.items():
            save_file(sd, str(args.out / f"{k}.safetensors"))
        manifest = published_manifest(args.upstream, up["llm"], work)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    set_source_buffers(mods["hift"], source_buffers(HIFT["source_seed"], HIFT["source_samples"]))
    lm_t, lm_m = lm_cases(mods["llm"], up["model"], mods["hift"], mods["flow"], notes)
    flow_t, flow_m = flow_case(up["model"], mods)
    hift_t, hift_m = hift_case(mods["hift"])
    bufs = source_buffers(HIFT["source_seed"], SOURCE_CHECK_SAMPLES)  # to check a regenerated recipe
    hift_t |= {"source_rand_ini": bufs["rand_ini"], "source_sine_waves_head": bufs["sine_waves"],
               "source_uv_head": bufs["uv"]}
    e2e_t, e2e_m = e2e_case(up["model"], mods)
    for name, t in (("lm_case", lm_t), ("flow_case", flow_t), ("hift_case", hift_t), ("e2e_case", e2e_t)):
        save_file({k: v.detach().contiguous() for k, v in t.items()}, str(args.out / f"{name}.safetensors"))

    notes += [
        "LM: the tiny vocabulary (512) has no id 151646, which Qwen2LM.inference asserts is in the text for "
        f"CosyVoice3LM; upstream's inference() was recompiled from its own source with that literal "
        f"replaced by {ENDOFPROMPT} (cases.json lm.endofprompt_id), which the prompt text contains.",
        "Flow: CausalConditionalCFM keeps its noise in a plain attribute rand_noise (not in flow.pt); it "
        "was replaced by the saved `noise`. CFG: the estimator runs as a batch of 2 (cond, zeros), "
        "v = 1.7 v_cond - 0.7 v_uncond, 10 Euler steps on a cosine t schedule.",
        "Flow streaming: chunks with finalize=False run the DiT with a 50-frame chunk mask "
        "(streaming=True); the final chunk of CosyVoice3Model.tts calls token2wav without stream= so it "
        "runs with streaming=False (full attention) and finalize=True.",
        "HiFT: CausalHiFTGenerator in eval mode draws no random numbers: SineGen2(causal=True) uses "
        "rand_ini [1,9] and sine_waves [1,7.2M,9] (uniform torch.rand, not randn) and SourceModuleHnNSF "
        "uses uv [1,7.2M,1] (uniform), all drawn once at construction. They were replaced by "
        "source_buffers(source_seed, ...). The F0 predictor runs in float64 (module cast in place by "
        "inference(), so save state dicts before calling it).",
        f"HiFT weights: after random init f0_predictor.classifier.weight was multiplied by {F0_GAIN} and "
        f"its bias set to {F0_GAIN * F0_SHIFT} (already in hift.safetensors) so that both voiced (f0 > 10) "
        "and unvoiced frames occur (hift.voiced_fraction, e2e.voiced_fraction).",
        "torchaudio is stubbed (module-level imports only; nothing used). CosyVoice3Model.tts runs a "
        "thread and sleeps 0.1 s per poll; with all tokens given up front the schedule is deterministic.",
    ]
    cases = {
        "upstream": {"repo": "FunAudioLLM/CosyVoice", "commit": upstream_commit(args.upstream, args.upstream_commit),
                     "sha256_16": file_hashes(args.upstream)},
        "generator": {"script": "scripts/cosyvoice3_fixtures.py", "torch": torch.__version__,
                      "transformers": transformers.__version__, "threads": 1,
                      "qwen_init_seed": QWEN_INIT_SEED, "yaml_seeds": "1986 (yaml __set_seed*), 0 (CFM __init__)",
                      "attn_implementation": mods["llm"].llm.model.config._attn_implementation},
        "tiny": TINY,
        "lm": lm_m, "flow": flow_m, "hift": hift_m, "e2e": e2e_m,
        "published_qwen": PUBLISHED_QWEN,
        "notes": notes,
    }
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    for f in sorted(args.out.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(args.out)}  {f.stat().st_size}")


if __name__ == "__main__":
    main()
