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

# Relative error a precision adds to one LM layer's output, ||y_q - y|| / ||y||: the worst measured
# by scripts/bench_quant.py (a 2048->5632->2048 gated MLP with bf16 activations: int8 0.0153, int4
# group 64 0.158; bf16 itself 0.005 against fp32; single Linears int8 0.006-0.009, int4 0.08-0.10).
# Predictions, shown per block in the plan and compared with quantization.max_layer_error.
PREDICTED_LAYER_ERROR = {"int8": 0.016, "int4": 0.16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"quantized precision must be one of {PRECISIONS}, not {precision!r}")
    return precision


# The int4 kernels' shape rules: aten._convert_weight_to_int4pack_for_cpu needs out_features divisible
# by 16 (the CUDA tinygemm packing by 8); both need whole groups of input columns.
INT4_OUT_MULTIPLE = 16


def int4_quantizable(in_features: int, out_features: int | None = None) -> bool:
    """int4 packs whole groups of input columns (and, for the kernels, output rows in 16s); a layer
    the kernels refuse stays int8. ``out_features`` None checks the input width only."""
    if out_features is not None and out_features % INT4_OUT_MULTIPLE:
        return False
    return in_features % INT4_GROUP_SIZE == 0


def quantized_linear_bytes(out_features: int, in_features: int, precision: str, scale_bytes: int) -> int:
    """Bytes of one Linear weight stored at ``precision`` (bias not included: it keeps its dtype)."""
    check_precision(precision)
    weights = out_features * in_features
    if precision == "int8":
        return weights + out_features * scale_bytes
    return weights // 2 + (weights // INT4_GROUP_SIZE) * 2 * scale_bytes
