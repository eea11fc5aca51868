"""The numbers of the ``flow:`` section of ``cosyvoice3.yaml`` (defaults: Fun-CosyVoice3-0.5B-2512)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import yaml_config
from edge_runtime.models.cosyvoice.flow.config import _evaluate


@dataclass(frozen=True)
class DiTFlowConfig:
    """Sizes of upstream's ``CausalMaskedDiffWithDiT`` (tokens -> 80-bin mel at 2 frames per token).

    Field names shared with CosyVoice2's :class:`~edge_runtime.models.cosyvoice.flow.FlowConfig`
    (vocab_size, mel_bins, chunk_tokens, chunk_frames, n_timesteps, ...) mean the same, so the CFM
    solver and :class:`~edge_runtime.models.cosyvoice.flow.FlowStream` serve both families."""

    vocab_size: int = 6561
    input_size: int = 80  # speech-token embedding width (= the mel mu the estimator reads)
    mel_bins: int = 80  # the flow's output_size
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    lookahead_channels: int = 1024  # PreLookaheadLayer's hidden width (conv1 out, conv2 in)
    chunk_tokens: int = 25  # streaming attention chunk in tokens (top-level chunk_size)
    chunk_frames: int = 50  # ... in mel frames (estimator.static_chunk_size)
    # DiT (the estimator)
    dim: int = 1024
    depth: int = 22
    heads: int = 16
    head_dim: int = 64
    ff_mult: float = 2
    time_freq_dim: int = 256  # fixed in upstream's TimestepEmbedding
    conv_pos_kernel: int = 31  # fixed in upstream's CausalConvPositionEmbedding
    conv_pos_groups: int = 16  # idem
    rotary_base: float = 10000.0  # x-transformers' RotaryEmbedding default
    # CausalConditionalCFM
    n_timesteps: int = 10  # fixed in upstream's flow.inference
    cfg_rate: float = 0.7
    t_scheduler: str = "cosine"

    @property
    def ff_inner(self) -> int:
        return int(self.dim * self.ff_mult)

    @property
    def estimator_in_channels(self) -> int:
        """The DiT's input projection reads noise, prompt mel, mu and speaker (in that order)."""
        return 2 * self.mel_bins + self.input_size + self.mel_bins

    def cache_bytes_per_frame(self, dtype_bytes: int = 4) -> int:
        """Bytes a :class:`~edge_runtime.models.cosyvoice.flow.FlowStream` keeps per mel frame of
        history: keys and values of every DiT block for every Euler step and both guidance branches
        (3.6 MB in fp32 at the published size; the conv position embedding's context is constant)."""
        return int(self.depth * 2 * self.heads * self.head_dim * 2 * self.n_timesteps * dtype_bytes)

    @classmethod
    def from_section(cls, flow: dict, top: dict | None = None, source: str = "cosyvoice3.yaml") -> DiTFlowConfig:
        """Build from the (tag-free) ``flow`` mapping; ``top`` is the whole yaml (for ``<ref>`` products)."""
        top = top or {}
        look = flow.get("pre_lookahead_layer") or {}
        dec = flow.get("decoder") or {}
        est = dec.get("estimator") or {}
        cfm = (dec.get("cfm_params") or {}).get("content") or dec.get("cfm_params") or {}
        d = cls()

        def number(section: dict, key: str, default: Any, where: str) -> int:
            return _evaluate(section.get(key, default), top, f"{source}: {where + '.' if where else ''}{key}")

        if not est or "dim" not in est:
            raise InvalidInputError(f"{source}: flow.decoder.estimator has no 'dim'; this is not a CosyVoice3 "
                                    "DiT flow (CosyVoice2's UNet flow is edge_runtime.models.cosyvoice.flow)")
        if est.get("long_skip_connection", False):
            raise InvalidInputError(f"{source}: flow.decoder.estimator.long_skip_connection is "
                                    f"{est['long_skip_connection']!r}; only false (as CosyVoice3 ships) is supported")
        if cfm.get("solver", "euler") != "euler":
            raise InvalidInputError(f"{source}: flow.decoder.cfm_params.solver is {cfm['solver']!r}; "
                                    "only 'euler' is supported")
        scheduler = str(cfm.get("t_scheduler", d.t_scheduler))
        if scheduler not in ("cosine", "linear"):
            raise InvalidInputError(f"{source}: flow.decoder.cfm_params.t_scheduler is {scheduler!r}; "
                                    "allowed: 'cosine', 'linear'")
        ff_mult = est.get("ff_mult", d.ff_mult)
        if isinstance(ff_mult, bool) or not isinstance(ff_mult, (int, float)) or ff_mult <= 0:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.ff_mult is {ff_mult!r}; "
                                    "a positive number is required")
        ratio = number(flow, "token_mel_ratio", d.token_mel_ratio, "flow")
        chunk_frames = number(est, "static_chunk_size", d.chunk_frames, "flow.decoder.estimator")
        mel = number(flow, "output_size", d.mel_bins, "flow")
        cfg = cls(
            vocab_size=number(flow, "vocab_size", d.vocab_size, "flow"),
            input_size=number(flow, "input_size", d.input_size, "flow"),
            mel_bins=mel,
            spk_embed_dim=number(flow, "spk_embed_dim", d.spk_embed_dim, "flow"),
            token_mel_ratio=ratio,
            pre_lookahead_len=number(flow, "pre_lookahead_len", d.pre_lookahead_len, "flow"),
            lookahead_channels=number(look, "channels", d.lookahead_channels, "flow.pre_lookahead_layer"),
            chunk_tokens=number(top, "chunk_size", chunk_frames // max(ratio, 1), ""),
            chunk_frames=chunk_frames,
            dim=number(est, "dim", d.dim, "flow.decoder.estimator"),
            depth=number(est, "depth", d.depth, "flow.decoder.estimator"),
            heads=number(est, "heads", d.heads, "flow.decoder.estimator"),
            head_dim=number(est, "dim_head", d.head_dim, "flow.decoder.estimator"),
            ff_mult=ff_mult,
            cfg_rate=float(cfm.get("inference_cfg_rate", d.cfg_rate)),
            t_scheduler=scheduler,
        )
        # sizes that must agree between sections (upstream would fail on a shape mismatch later)
        for section, key, expected in ((look, "in_channels", cfg.input_size),
                                       (look, "pre_lookahead_len", cfg.pre_lookahead_len),
                                       (est, "mel_dim", cfg.mel_bins), (est, "mu_dim", cfg.input_size),
                                       (est, "spk_dim", cfg.mel_bins), (est, "out_channels", cfg.mel_bins),
                                       (dec, "spk_emb_dim", cfg.mel_bins)):
            where = "flow.pre_lookahead_layer" if section is look else (
                "flow.decoder" if section is dec else "flow.decoder.estimator")
            value = number(section, key, expected, where)
            if value != expected:
                raise InvalidInputError(f"{source}: {where}.{key} is {value}; the flow needs {expected} "
                                        "(it must agree with flow.input_size / output_size / pre_lookahead_len)")
        cfg._check(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> DiTFlowConfig:
        """Read ``cosyvoice3.yaml`` (tags ignored) and build from its ``flow`` section."""
        data = yaml_config.load(path)
        if not isinstance(data.get("flow"), dict):
            raise InvalidInputError(f"{path}: no 'flow' section")
        return cls.from_section(data["flow"], data, str(path))

    def _check(self, source: str) -> None:
        for key, value in (("flow.vocab_size", self.vocab_size), ("flow.token_mel_ratio", self.token_mel_ratio),
                           ("flow.decoder.estimator.dim", self.dim), ("flow.decoder.estimator.depth", self.depth),
                           ("flow.decoder.estimator.heads", self.heads),
                           ("flow.decoder.estimator.static_chunk_size", self.chunk_frames)):
            if value < 1:
                raise InvalidInputError(f"{source}: {key} is {value}; a positive integer is required")
        if self.head_dim < 2 or self.head_dim % 2:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.dim_head is {self.head_dim}; an even "
                                    "number >= 2 is required (rotary embedding pairs)")
        if self.dim % self.conv_pos_groups:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.dim is {self.dim}; it must be a multiple of "
                                    f"{self.conv_pos_groups} (the conv position embedding's groups)")
        if self.chunk_frames != self.chunk_tokens * self.token_mel_ratio:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.static_chunk_size is {self.chunk_frames}; "
                                    f"incremental streaming needs chunk_size x token_mel_ratio = "
                                    f"{self.chunk_tokens * self.token_mel_ratio}")
