"""Piper .onnx -> PiperVits weights, read with the `onnx` package alone (no onnxruntime).

Piper's exporter keeps most VITS names, but not all: the phoneme embedding may be called `sid`,
weight-normed convs (the flows' WaveNet) become anonymous `onnx::Conv_NNNN` constants, and
`dp.flows.0.logs` is folded into an `Exp` output holding exp(-logs). So every Conv, ConvTranspose
and embedding Gather is named after the node that consumes its weights (node names carry the
module path, e.g. `/flow/flows.0/enc/in_layers.0/Conv`), and folded Exp constants are inverted.
Training-only parts (enc_q, dp.flows.1, the dp post flows) are absent and not needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.models.piper.config import VitsHyperParams
from edge_runtime.models.piper.errors import VoiceLoadError
from edge_runtime.models.piper.vits import VITS_PREFIXES, PiperVits, skip_weight_init

_PARAM_NAME = re.compile(r"^(enc_p|dp|flow|dec|emb_g)\.[\w.]+$")
_FOLDED_EXP = re.compile(r"^/(dp/flows\.\d+)/Exp(?:_\d+)?_output_0$")


def _module_of(node_name: str) -> str | None:
    """'/flow/flows.0/enc/in_layers.0/Conv' -> 'flow.flows.0.enc.in_layers.0'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def read_onnx(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """VITS-named weights and per-module conv attributes from a Piper .onnx file."""
    import onnx  # lazy: only the first load of a voice pays for it
    from onnx import helper, numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ...
        raise VoiceLoadError(f"voice model {path} is not a readable ONNX file: {exc}") from None
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    weights: dict[str, np.ndarray] = {}
    attrs: dict[str, dict[str, Any]] = {}

    def take(onnx_name: str, vits_name: str) -> None:
        weights[vits_name] = numpy_helper.to_array(inits[onnx_name])

    for node in graph.node:
        module = _module_of(node.name)
        if not module:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            attrs[module] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            for role, name in zip(("weight", "bias"), node.input[1:]):
                if name in inits:
                    take(name, f"{module}.{role}")
        elif node.op_type == "Gather" and module.endswith(("emb", "emb_g")) and node.input[0] in inits:
            take(node.input[0], f"{module}.weight")  # embedding tables (the phonemes' may be named 'sid')
        elif node.op_type == "LessOrEqual" and module.startswith("dp.flows."):  # the spline's tail bound
            bound = inits.get(node.input[1], consts.get(node.input[1]))
            if bound is not None and numpy_helper.to_array(bound).size == 1:
                attrs["dp"] = {"tail_bound": float(numpy_helper.to_array(bound))}
    for name in inits:
        if _PARAM_NAME.match(name) and name not in weights:
            take(name, name)  # gamma/beta, emb_rel_*, dp.flows.0.m, ...
        elif (m := _FOLDED_EXP.match(name)) and f"{m.group(1).replace('/', '.')}.logs" not in weights:
            value = numpy_helper.to_array(inits[name]).astype(np.float32)
            weights[f"{m.group(1).replace('/', '.')}.logs"] = -np.log(value)  # stored exp(-logs)
    if not weights:
        raise VoiceLoadError(f"voice model {path} has no VITS weights: is it a Piper voice?")
    return weights, attrs


def to_module_names(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """VITS names (enc_p.*, dp.*, ...) -> PiperVits state_dict names (text_encoder.*, ...)."""
    back = {v: k for k, v in VITS_PREFIXES.items()}
    out = {}
    for name, value in weights.items():
        prefix, rest = name.split(".", 1)
        if prefix in back:
            out[f"{back[prefix]}.{rest}"] = torch.from_numpy(np.array(value, dtype=np.float32))  # writable copy
    return out


def load_state(model: PiperVits, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Strict load with errors that name the voice file and the parameter."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise VoiceLoadError(f"voice model {source} lacks weights the architecture needs: {shown}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise VoiceLoadError(f"voice model {source}: weight {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(tensor.shape)}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


def convert(path: str | Path) -> tuple[PiperVits, VitsHyperParams]:
    """Build a PiperVits from a Piper .onnx: infer the architecture, then fill every weight."""
    weights, attrs = read_onnx(path)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    try:
        hp = VitsHyperParams.from_shapes(shapes, attrs)
    except ValueError as exc:
        raise VoiceLoadError(f"voice model {path}: {exc}") from None
    with skip_weight_init():  # every weight is assigned below
        model = PiperVits(hp)
    load_state(model, to_module_names(weights), path)
    return model.eval(), hp
