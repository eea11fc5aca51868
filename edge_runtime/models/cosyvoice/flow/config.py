"""The numbers of the ``flow:`` section of ``cosyvoice2.yaml`` (defaults: CosyVoice2-0.5B)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidInputError
from edge_runtime.models.cosyvoice import yaml_config

_REF = re.compile(r"^<([A-Za-z_]\w*)>$")


@dataclass(frozen=True)
class FlowConfig:
    """Sizes of upstream's ``CausalMaskedDiffWithXvec`` (tokens -> 80-bin mel at 2 frames per token)."""

    vocab_size: int = 6561
    input_size: int = 512  # speech-token embedding width (the encoder's input)
    mel_bins: int = 80  # the flow's output_size
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    # UpsampleConformerEncoder
    encoder_size: int = 512
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    encoder_blocks: int = 6
    encoder_up_blocks: int = 4  # fixed in upstream's code, not in the yaml
    chunk_tokens: int = 25  # attention chunk when streaming, in tokens (static_chunk_size)
    # CausalConditionalDecoder (the estimator: a one-level 1-D UNet)
    estimator_in_channels: int = 320  # noisy mel + encoder mel + speaker + prompt mel, 80 each
    estimator_channels: int = 256
    estimator_heads: int = 8
    estimator_head_dim: int = 64
    estimator_blocks: int = 4  # transformer blocks after each resnet block
    estimator_mid_blocks: int = 12
    chunk_frames: int = 50  # attention chunk when streaming, in mel frames
    # CausalConditionalCFM
    n_timesteps: int = 10  # fixed in upstream's flow.inference
    cfg_rate: float = 0.7  # classifier-free guidance: (1 + r) * cond - r * uncond
    t_scheduler: str = "cosine"

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.estimator_channels

    @property
    def attention_layers(self) -> int:
        """Transformer blocks of the estimator (down + mid + up)."""
        return self.estimator_blocks * (self.estimator_mid_blocks + 2)

    def cache_bytes_per_frame(self, dtype_bytes: int = 4) -> int:
        """Bytes a :class:`FlowStream` keeps per mel frame of history: keys and values of every
        estimator attention layer for every Euler step and both guidance branches, plus the encoder's
        (token-level layers count once per token = ``token_mel_ratio`` frames)."""
        estimator = self.attention_layers * 2 * self.estimator_heads * self.estimator_head_dim * 2 * self.n_timesteps
        encoder = 2 * self.encoder_size * (self.encoder_up_blocks + self.encoder_blocks / self.token_mel_ratio)
        return int((estimator + encoder) * dtype_bytes)

    @classmethod
    def from_section(cls, flow: dict, top: dict | None = None, source: str = "cosyvoice2.yaml") -> FlowConfig:
        """Build from the (tag-free) ``flow`` mapping; ``top`` is the whole yaml (for ``<ref>`` products)."""
        top = top or {}
        enc = flow.get("encoder") or {}
        dec = flow.get("decoder") or {}
        est = dec.get("estimator") or {}
        cfm = (dec.get("cfm_params") or {}).get("content") or dec.get("cfm_params") or {}
        d = cls()

        def number(section: dict, key: str, default: Any, where: str) -> int:
            value = section.get(key, default)
            return _evaluate(value, top, f"{source}: {where}.{key}")

        def expect(section: dict, key: str, allowed: Any, where: str) -> None:
            value = section.get(key, allowed)
            if value != allowed:
                raise InvalidInputError(f"{source}: {where}.{key} is {value!r}; only {allowed!r} is supported "
                                        "(CosyVoice2's causal flow)")

        for key, allowed in (("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                             ("selfattention_layer_type", "rel_selfattn"), ("normalize_before", True),
                             ("macaron_style", False), ("use_cnn_module", False), ("activation_type", "swish")):
            expect(enc, key, allowed, "flow.encoder")
        expect(est, "act_fn", "gelu", "flow.decoder.estimator")
        expect(cfm, "solver", "euler", "flow.decoder.cfm_params")
        channels = est.get("channels", [d.estimator_channels])
        if not isinstance(channels, list) or len(channels) != 1:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.channels is {channels!r}; only a one-level "
                                    "UNet ([C], as CosyVoice2 ships) is supported")
        scheduler = str(cfm.get("t_scheduler", d.t_scheduler))
        if scheduler not in ("cosine", "linear"):
            raise InvalidInputError(f"{source}: flow.decoder.cfm_params.t_scheduler is {scheduler!r}; "
                                    "allowed: 'cosine', 'linear'")
        chunk_tokens = number(enc, "static_chunk_size", d.chunk_tokens, "flow.encoder")
        ratio = number(flow, "token_mel_ratio", d.token_mel_ratio, "flow")
        cfg = cls(
            vocab_size=number(flow, "vocab_size", d.vocab_size, "flow"),
            input_size=number(flow, "input_size", d.input_size, "flow"),
            mel_bins=number(flow, "output_size", d.mel_bins, "flow"),
            spk_embed_dim=number(flow, "spk_embed_dim", d.spk_embed_dim, "flow"),
            token_mel_ratio=ratio,
            pre_lookahead_len=number(flow, "pre_lookahead_len", d.pre_lookahead_len, "flow"),
            encoder_size=number(enc, "output_size", d.encoder_size, "flow.encoder"),
            encoder_heads=number(enc, "attention_heads", d.encoder_heads, "flow.encoder"),
            encoder_ffn=number(enc, "linear_units", d.encoder_ffn, "flow.encoder"),
            encoder_blocks=number(enc, "num_blocks", d.encoder_blocks, "flow.encoder"),
            chunk_tokens=chunk_tokens,
            estimator_in_channels=number(est, "in_channels", d.estimator_in_channels, "flow.decoder.estimator"),
            estimator_channels=_evaluate(channels[0], top, f"{source}: flow.decoder.estimator.channels"),
            estimator_heads=number(est, "num_heads", d.estimator_heads, "flow.decoder.estimator"),
            estimator_head_dim=number(est, "attention_head_dim", d.estimator_head_dim, "flow.decoder.estimator"),
            estimator_blocks=number(est, "n_blocks", d.estimator_blocks, "flow.decoder.estimator"),
            estimator_mid_blocks=number(est, "num_mid_blocks", d.estimator_mid_blocks, "flow.decoder.estimator"),
            chunk_frames=number(est, "static_chunk_size", chunk_tokens * ratio, "flow.decoder.estimator"),
            cfg_rate=float(cfm.get("inference_cfg_rate", d.cfg_rate)),
            t_scheduler=scheduler,
        )
        cfg._check(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> FlowConfig:
        """Read ``cosyvoice2.yaml`` (tags ignored) and build from its ``flow`` section."""
        data = yaml_config.load(path)
        if not isinstance(data.get("flow"), dict):
            raise InvalidInputError(f"{path}: no 'flow' section")
        return cls.from_section(data["flow"], data, str(path))

    def _check(self, source: str) -> None:
        if self.estimator_in_channels != 4 * self.mel_bins:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.in_channels is {self.estimator_in_channels}; "
                                    f"the estimator reads 4 x {self.mel_bins} channels (noise, mu, speaker, prompt)")
        if self.encoder_size % self.encoder_heads:
            raise InvalidInputError(f"{source}: flow.encoder.output_size {self.encoder_size} is not a multiple of "
                                    f"attention_heads {self.encoder_heads}")
        if self.chunk_frames != self.chunk_tokens * self.token_mel_ratio:
            raise InvalidInputError(f"{source}: flow.decoder.estimator.static_chunk_size is {self.chunk_frames}; "
                                    f"incremental streaming needs chunk_size x token_mel_ratio = "
                                    f"{self.chunk_tokens * self.token_mel_ratio}")


def _evaluate(value: Any, top: dict, where: str) -> int:
    """An int, or a hyperpyyaml ``!ref`` product such as ``<chunk_size> * <token_mel_ratio>``."""
    if isinstance(value, bool):
        raise InvalidInputError(f"{where} is {value!r}; an integer is required")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    product = 1
    for term in str(value).split("*"):
        term = term.strip()
        ref = _REF.match(term)
        resolved = top.get(ref.group(1)) if ref else term
        try:
            product *= int(resolved)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{where} is {value!r}; expected an integer or a product of "
                                    "<top-level keys> and integers") from None
    return product
