"""Weight-only quantization as the planner sees it: which precisions exist, what a quantized block
weighs, and the error each precision is predicted to add. The runtime's quantizer
(runtime/backends/quantized.py) stores tensors whose sizes equal these formulas exactly.

Only nn.Linear weights of components a family marks ``quantizable`` (its language model's decoder
layers) are quantized; biases, norms, embeddings, heads, codecs and diffusion heads keep their dtype.

* int8: one int8 per weight, symmetric, one scale per output row (in the compute dtype).
* int4: two weights per byte, asymmetric, per group of INT4_GROUP_SIZE input columns one scale and
  one zero point per output row (in the compute dtype).
"""

from __future__ import annotations

PRECISIONS = ("int8", "int4")  # ordered from least to most lossy
INT4_GROUP_SIZE = 64

# Relative error a precision adds to one linear layer's output, ||y_q - y|| / ||y||, measured by
# scripts/bench_quant.py on this project's tiny models and a 2048->5632->2048 MLP (bf16
# activations; bf16 itself measures ~0.005 against fp32). Predictions, shown in the plan.
PREDICTED_LAYER_ERROR = {"int8": 0.016, "int4": 0.12}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"quantized precision must be one of {PRECISIONS}, not {precision!r}")
    return precision


def int4_quantizable(in_features: int) -> bool:
    """int4 packs whole groups of input columns; a layer whose width is no multiple stays int8."""
    return in_features % INT4_GROUP_SIZE == 0


def quantized_linear_bytes(out_features: int, in_features: int, precision: str, scale_bytes: int) -> int:
    """Bytes of one Linear weight stored at ``precision`` (bias not included: it keeps its dtype)."""
    check_precision(precision)
    weights = out_features * in_features
    if precision == "int8":
        return weights + out_features * scale_bytes
    return weights // 2 + (weights // INT4_GROUP_SIZE) * 2 * scale_bytes
