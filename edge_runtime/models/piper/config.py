"""A Piper voice's settings (.onnx.json) and its VITS hyperparameters (inferred from the weights).

Nothing here is hard-coded for one voice: sizes come from initializer shapes, and what shapes
cannot tell (upsample strides, dilations, paddings) from the ONNX graph's node attributes.
Weight names are the original VITS ones (enc_p.*, dp.*, flow.*, dec.*, emb_g.*).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.models.piper.errors import VoiceLoadError

Shapes = Mapping[str, tuple[int, ...]]
ConvAttrs = Mapping[str, Mapping[str, Any]]  # module name -> {"dilations": [..], "strides": [..], "pads": [..]}


@dataclass(frozen=True)
class PiperVoiceConfig:
    """What the runtime needs from a voice's .onnx.json."""

    sample_rate: int
    phoneme_id_map: dict[str, list[int]]
    num_symbols: int
    num_speakers: int = 1
    speaker_id_map: dict[str, int] = field(default_factory=dict)
    espeak_voice: str = "en-us"
    phoneme_type: str = "espeak"
    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8
    num_symbols_declared: bool = True  # False: derived from the id map (JSON without num_symbols)

    @classmethod
    def from_json(cls, path: str | Path) -> PiperVoiceConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VoiceLoadError(f"voice config {path} does not exist (expected next to the .onnx)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VoiceLoadError(f"voice config {path} is not readable JSON: {exc}") from None
        try:
            id_map = {str(k): [int(i) for i in v] for k, v in data["phoneme_id_map"].items()}
            all_ids = [i for ids in id_map.values() for i in ids]
            num_symbols = int(data.get("num_symbols") or (max(all_ids) + 1))
            inference = data.get("inference") or {}
            config = cls(
                sample_rate=int(data["audio"]["sample_rate"]),
                phoneme_id_map=id_map,
                num_symbols=num_symbols,
                num_speakers=int(data.get("num_speakers", 1)),
                speaker_id_map={str(k): int(v) for k, v in (data.get("speaker_id_map") or {}).items()},
                espeak_voice=str((data.get("espeak") or {}).get("voice", "en-us")),
                phoneme_type=str(data.get("phoneme_type", "espeak")),
                noise_scale=float(inference.get("noise_scale", 0.667)),
                length_scale=float(inference.get("length_scale", 1.0)),
                noise_w=float(inference.get("noise_w", 0.8)),
                num_symbols_declared="num_symbols" in data,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VoiceLoadError(f"voice config {path} lacks or mangles a required field: {exc!r}") from None
        bad = sorted({i for i in all_ids if not 0 <= i < config.num_symbols})
        if bad:
            raise VoiceLoadError(f"voice config {path}: phoneme ids {bad[:10]} are outside 0..{config.num_symbols - 1}")
        return config

    def check_against(self, hp: VitsHyperParams, path: str | Path) -> None:
        """Raise when the JSON and the weights describe different models."""
        top = max((i for ids in self.phoneme_id_map.values() for i in ids), default=0)
        if top >= hp.n_vocab:
            raise VoiceLoadError(f"voice config {path} maps phonemes to ids up to {top} but the model only has "
                                 f"{hp.n_vocab} phoneme embeddings: the .onnx.json belongs to another voice")
        if self.num_symbols_declared and self.num_symbols != hp.n_vocab:
            raise VoiceLoadError(f"voice config {path} says num_symbols={self.num_symbols} but the model's "
                                 f"phoneme embedding has {hp.n_vocab} rows: the .onnx.json belongs to another voice")
        if self.num_speakers > 1 and self.num_speakers != hp.n_speakers:
            raise VoiceLoadError(f"voice config {path} says num_speakers={self.num_speakers} but the model has "
                                 f"{hp.n_speakers} speaker embeddings")


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for name in shapes if (m := regex.match(name))})


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for name in shapes if (m := regex.match(name))})


def _dilation(attrs: ConvAttrs, module: str, default: int) -> int:
    return int((attrs.get(module) or {}).get("dilations", [default])[0])


@dataclass(frozen=True)
class VitsHyperParams:
    """The architecture of one VITS voice, enough to build `PiperVits` with empty weights."""

    n_vocab: int
    hidden_channels: int
    filter_channels: int
    n_heads: int
    n_layers: int
    kernel_size: int
    window_size: int
    heads_share: bool
    inter_channels: int
    # stochastic duration predictor
    dp_filter_channels: int
    dp_kernel_size: int
    dp_n_layers: int
    dp_dilations: list[int]
    dp_n_flows: int
    dp_flow_indices: list[int]  # ConvFlow positions present (reverse mode skips the first)
    dp_flow_n_layers: int
    dp_flow_dilations: list[int]
    dp_num_bins: int
    dp_tail_bound: float
    # normalising flow
    n_flows: int
    wn_kernel_size: int
    wn_n_layers: int
    wn_dilations: list[int]
    mean_only: bool
    # HiFi-GAN decoder
    upsample_initial_channel: int
    upsample_rates: list[int]
    upsample_kernel_sizes: list[int]
    upsample_paddings: list[int]
    resblock: str  # "1" or "2"
    resblock_kernel_sizes: list[int]
    resblock_dilation_sizes: list[list[int]]
    pre_kernel_size: int
    post_kernel_size: int
    post_bias: bool
    # speakers
    n_speakers: int = 1
    gin_channels: int = 0

    @property
    def hop_length(self) -> int:
        out = 1
        for rate in self.upsample_rates:
            out *= rate
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VitsHyperParams:
        return cls(**json.loads(text))

    @classmethod
    def from_shapes(cls, shapes: Shapes, attrs: ConvAttrs) -> VitsHyperParams:
        """Infer every size from weight shapes; strides and dilations from conv attributes."""
        try:
            return cls._from_shapes(shapes, attrs)
        except (KeyError, IndexError, ZeroDivisionError) as exc:
            raise ValueError(f"the weights do not look like a Piper VITS voice (missing {exc})") from None

    @classmethod
    def _from_shapes(cls, s: Shapes, attrs: ConvAttrs) -> VitsHyperParams:
        n_vocab, hidden = s["enc_p.emb.weight"]
        heads_dim, window_len, k_channels = s["enc_p.encoder.attn_layers.0.emb_rel_k"]
        filter_channels, _, kernel = s["enc_p.encoder.ffn_layers.0.conv_1.weight"]
        n_heads = hidden // k_channels
        # dp: its own DDSConv, then ConvFlows at odd positions 1, 3, ... (position 1 unused at inference)
        dp_filter, _, dp_kernel = s["dp.convs.convs_sep.0.weight"]
        dp_layers = _count(s, r"dp\.convs\.convs_sep\.(\d+)\.weight")
        flow_idx = _indices(s, r"dp\.flows\.(\d+)\.pre\.weight")
        first = f"dp.flows.{flow_idx[0]}"
        dp_flow_layers = _count(s, re.escape(first) + r"\.convs\.convs_sep\.(\d+)\.weight")
        num_bins = (s[f"{first}.proj.weight"][0] // (s[f"{first}.pre.weight"][1]) + 1) // 3
        coupling = _indices(s, r"flow\.flows\.(\d+)\.pre\.weight")
        wn_out, wn_hidden, wn_kernel = s["flow.flows.0.enc.in_layers.0.weight"]
        wn_layers = _count(s, r"flow\.flows\.0\.enc\.in_layers\.(\d+)\.weight")
        inter = s["enc_p.proj.weight"][0] // 2
        # decoder
        uic, _, pre_k = s["dec.conv_pre.weight"]
        n_ups = _count(s, r"dec\.ups\.(\d+)\.weight")
        ups = [f"dec.ups.{i}" for i in range(n_ups)]
        up_kernels = [s[f"{u}.weight"][2] for u in ups]
        up_rates = [int(attrs[u]["strides"][0]) for u in ups]
        up_pads = [int(attrs[u].get("pads", [(k - r) // 2])[0]) for u, k, r in zip(ups, up_kernels, up_rates)]
        n_blocks = _count(s, r"dec\.resblocks\.(\d+)\.")
        n_kernels = n_blocks // n_ups
        rb_type = "1" if "dec.resblocks.0.convs1.0.weight" in s else "2"
        conv_name = "convs1" if rb_type == "1" else "convs"
        rb_kernels, rb_dils = [], []
        for j in range(n_kernels):
            rb_kernels.append(s[f"dec.resblocks.{j}.{conv_name}.0.weight"][2])
            n_convs = _count(s, rf"dec\.resblocks\.{j}\.{conv_name}\.(\d+)\.weight")
            rb_dils.append([_dilation(attrs, f"dec.resblocks.{j}.{conv_name}.{c}", 1) for c in range(n_convs)])
        n_speakers, gin = s.get("emb_g.weight", (1, 0))
        return cls(
            n_vocab=n_vocab, hidden_channels=hidden, filter_channels=filter_channels, n_heads=n_heads,
            n_layers=_count(s, r"enc_p\.encoder\.attn_layers\.(\d+)\."), kernel_size=kernel,
            window_size=(window_len - 1) // 2, heads_share=heads_dim == 1,
            inter_channels=inter,
            dp_filter_channels=dp_filter, dp_kernel_size=dp_kernel, dp_n_layers=dp_layers,
            dp_dilations=[_dilation(attrs, f"dp.convs.convs_sep.{i}", dp_kernel ** i) for i in range(dp_layers)],
            dp_n_flows=(max(flow_idx) + 1) // 2, dp_flow_indices=flow_idx, dp_flow_n_layers=dp_flow_layers,
            dp_flow_dilations=[_dilation(attrs, f"{first}.convs.convs_sep.{i}", dp_kernel ** i)
                               for i in range(dp_flow_layers)],
            dp_num_bins=num_bins, dp_tail_bound=float((attrs.get("dp") or {}).get("tail_bound", 5.0)),
            n_flows=len(coupling), wn_kernel_size=wn_kernel, wn_n_layers=wn_layers,
            wn_dilations=[_dilation(attrs, f"flow.flows.0.enc.in_layers.{i}", 1) for i in range(wn_layers)],
            mean_only=s["flow.flows.0.post.weight"][0] == inter // 2,
            upsample_initial_channel=uic, upsample_rates=up_rates, upsample_kernel_sizes=up_kernels,
            upsample_paddings=up_pads, resblock=rb_type, resblock_kernel_sizes=rb_kernels,
            resblock_dilation_sizes=rb_dils, pre_kernel_size=pre_k,
            post_kernel_size=s["dec.conv_post.weight"][2], post_bias="dec.conv_post.bias" in s,
            n_speakers=n_speakers, gin_channels=gin,
        )
