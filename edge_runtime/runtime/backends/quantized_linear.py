"""QuantizedLinear: an nn.Linear whose weight is stored int8 or int4 (weight-only quantization),
as plain tensors (``qweight``, ``scales``, ``bias``) that every backend loads, streams and maps
like any other parameter. Sizes equal policy.quantization.quantized_linear_bytes exactly.

int8: ``qweight`` int8 [out, in], symmetric per output row; ``scales`` [out] in the compute dtype;
  w = qweight * scales[:, None]. Kernel: aten._weight_int8pack_mm (CPU: vectorised, fp32/bf16/fp16
  activations, scales of the same dtype; CUDA: aten/src/ATen/native/cuda/int8mm.cu is a plain fp32
  dot product per output element, no tensor cores, so it serves decode-sized inputs and a
  dequantized cuBLAS GEMM serves prefills: CUDA_INT8_KERNEL_MAX_ROWS, not measured yet).
int4: asymmetric per group of ``group_size`` input columns; ``scales`` [in/group, out, 2] holds
  (scale, zero) pairs in the compute dtype: w = (q - 8) * scale + zero, q in 0..15. The stored
  ``qweight`` depends on where the block computes (its *layout*):
    "cpu"   aten._convert_weight_to_int4pack_for_cpu: uint8 [out, in/2], used by
            aten._weight_int4pack_mm_for_cpu (fp32/bf16/fp16). The packing follows the CPU's
            vector ISA (AVX512 / AVX2 / none), so a cached file is only valid on such a CPU.
    "cuda"  aten._convert_weight_to_int4pack (tinygemm): int32 [out/8, in/(k*16), 32, k/2],
            used by aten._weight_int4pack_mm; bf16 only, compute capability >= 8.0.
    "plain" uint8 [out, in/2], high nibble = even column; dequantized per call (a CUDA device the
            tinygemm kernel does not serve: fp16/fp32 compute, or a pre-Ampere GPU).
  All three hold in*out/2 bytes. Layers whose shapes the kernels refuse (policy.quantization.
  int4_quantizable) are stored int8 instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.policy.quantization import INT4_GROUP_SIZE, check_precision, int4_quantizable

LAYOUTS = ("cpu", "cuda", "plain")
# CUDA int8: at most this many input rows use aten._weight_int8pack_mm (torch 2.13's CUDA kernel
# is one fp32 warp per output element: fine for a GEMV, far slower than cuBLAS for a prefill)
CUDA_INT8_KERNEL_MAX_ROWS = 8


def int4_layout(device: torch.device | str, dtype: torch.dtype) -> str:
    """The int4 storage layout for a block computing on ``device`` in ``dtype``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and dtype == torch.bfloat16 and _cuda_capability(device) >= (8, 0):
        return "cuda"
    return "plain"


def effective_precision(precision: str, out_features: int, in_features: int,
                        group_size: int = INT4_GROUP_SIZE) -> str:
    """``precision``, or int8 for an int4 layer whose shape the int4 kernels refuse."""
    check_precision(precision)
    if precision == "int4" and not (int4_quantizable(in_features, out_features) and in_features % group_size == 0):
        return "int8"
    return precision


def storage_shapes(out_features: int, in_features: int, precision: str, layout: str = "cpu",
                   group_size: int = INT4_GROUP_SIZE) -> tuple[tuple[tuple[int, ...], torch.dtype],
                                                              tuple[int, ...]]:
    """((qweight shape, qweight dtype), scales shape) of a layer stored at ``precision``."""
    if precision == "int8":
        return ((out_features, in_features), torch.int8), (out_features,)
    scales = (in_features // group_size, out_features, 2)
    if layout == "cuda":
        tiles = _inner_k_tiles(in_features)
        return ((out_features // 8, in_features // (tiles * 16), 32, tiles // 2), torch.int32), scales
    if layout in ("cpu", "plain"):
        return ((out_features, in_features // 2), torch.uint8), scales
    raise ValueError(f"int4 layout must be one of {LAYOUTS}, not {layout!r}")


class QuantizedLinear(nn.Module):
    """y = x @ W^T + b with W stored int8 / int4 (module docstring). Inputs of any leading shape;
    they are computed in the scales' dtype (the compute dtype) and returned in their own."""

    def __init__(self, in_features: int, out_features: int, bias: bool, precision: str,
                 dtype: torch.dtype, layout: str = "cpu", group_size: int = INT4_GROUP_SIZE,
                 device: torch.device | str = "meta", bias_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_precision(precision)
        if precision == "int4":
            if layout not in LAYOUTS:
                raise ValueError(f"int4 layout must be one of {LAYOUTS}, not {layout!r}")
            if in_features % group_size or out_features % 16:
                raise ValueError(f"int4 needs in_features divisible by {group_size} and out_features by 16, "
                                 f"not {in_features} x {out_features}: store this layer int8")
        self.in_features, self.out_features = in_features, out_features
        self.precision, self.layout, self.group_size = precision, layout if precision == "int4" else "", group_size
        (qshape, qdtype), sshape = storage_shapes(out_features, in_features, precision, layout, group_size)
        self.qweight = nn.Parameter(torch.empty(qshape, dtype=qdtype, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(sshape, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype or dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction from a float weight ------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, precision: str, dtype: torch.dtype | None = None,
                    layout: str | None = None, group_size: int = INT4_GROUP_SIZE) -> QuantizedLinear:
        """``linear`` quantized (its device; ``dtype`` defaults to its weight's); an int4 request
        on a shape the kernels refuse gives int8."""
        weight = linear.weight.detach()
        dtype = dtype or weight.dtype
        precision = effective_precision(precision, linear.out_features, linear.in_features, group_size)
        layout = layout or int4_layout(weight.device, dtype)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, precision, dtype,
                     layout, group_size, device=weight.device)
        qweight, scales = quantize_weight(weight, precision, dtype, layout, group_size)
        module.qweight.data, module.scales.data = qweight, scales
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().to(dtype).clone()
        return module

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.scales.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        cuda = self.qweight.device.type == "cuda"
        if self.precision == "int8":
            if not cuda or x2.shape[0] <= CUDA_INT8_KERNEL_MAX_ROWS:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
            else:
                y = F.linear(x2, self.dequantize())
        elif self.layout == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.qweight, self.group_size,
                                                   self.scales.to(torch.bfloat16)).to(dtype)
        else:
            y = F.linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernels multiply by, [out, in], in the compute dtype (a reference for
        tests and the fallback of devices without a kernel)."""
        dtype = self.scales.dtype
        if self.precision == "int8":
            return self.qweight.to(dtype) * self.scales[:, None]
        if self.layout == "plain":
            q = unpack_nibbles(self.qweight).to(dtype)
            scale, zero = self.scales[..., 0].t(), self.scales[..., 1].t()  # [out, groups]
            g = self.group_size
            w = (q.view(self.out_features, -1, g) - 8) * scale[..., None] + zero[..., None]
            return w.reshape(self.out_features, self.in_features)
        # packed layouts: the kernel applied to the identity gives exactly the weight it uses
        eye = torch.eye(self.in_features, dtype=dtype, device=self.qweight.device)
        if self.layout == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group_size, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm(eye.to(torch.bfloat16), self.qweight, self.group_size,
                                                     self.scales.to(torch.bfloat16)).to(dtype)
        return out.t().contiguous()

    @property
    def stored_bytes(self) -> int:
        """Bytes of the quantized weight (qweight + scales; the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def extra_repr(self) -> str:
        layout = f", layout={self.layout}, group_size={self.group_size}" if self.precision == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, precision={self.precision}{layout}")


# -- quantization -------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, precision: str, dtype: torch.dtype, layout: str = "cpu",
                    group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales) of a float [out, in] weight, on the weight's device. Scales are rounded
    to ``dtype`` before the weights are rounded against them, so the stored pair is consistent."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    if precision == "int8":
        scale = _representable(w.abs().amax(dim=1) / 127, dtype)
        q = torch.round(w / scale[:, None]).clamp_(-128, 127).to(torch.int8)
        return q, scale.to(dtype)
    check_precision(precision)
    groups = w.view(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = _representable((hi - lo) / 15, dtype)
    zero = (lo + 8 * scale).to(dtype).float()  # w = (q - 8) * scale + zero
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
    q = q.view(out_features, in_features).to(torch.int32)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    if layout == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 2).to(weight.device)
    elif layout == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q), _inner_k_tiles(in_features))
    elif layout == "plain":
        packed = pack_nibbles(q)
    else:
        raise ValueError(f"int4 layout must be one of {LAYOUTS}, not {layout!r}")
    return packed, scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int [out, in] values 0..15 -> uint8 [out, in/2], even column in the high nibble (the
    input aten._convert_weight_to_int4pack expects)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4 | q[:, 1::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [out, in/2] -> uint8 [out, in]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


def _representable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to ``dtype`` (fp32 values), zeros (constant rows or groups, underflow)
    replaced by 1 so nothing divides by zero."""
    rounded = scale.to(dtype).float()
    return torch.where(rounded > 0, rounded, torch.ones_like(rounded))


def _inner_k_tiles(in_features: int) -> int:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"int4 (CUDA) needs in_features divisible by 32, not {in_features}")


@functools.lru_cache(maxsize=None)
def _cuda_capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    if not torch.cuda.is_available():
        return (0, 0)
    return _cuda_capability_of(device.index if device.index is not None else torch.cuda.current_device())


def quantize_linears(root: nn.Module, precision_of: dict[str, str], dtype_of, layout_of,
                     group_size: int = INT4_GROUP_SIZE) -> dict[str, QuantizedLinear]:
    """Swap every nn.Linear inside the modules named in ``precision_of`` (module name -> precision)
    for an empty QuantizedLinear on meta. ``dtype_of(linear name)`` gives the compute dtype of its
    weight, ``layout_of(block name, dtype)`` its int4 layout. Returns linear name -> new module
    (the caller fills them from a checkpoint). Names not naming a module are skipped."""
    swapped: dict[str, QuantizedLinear] = {}
    modules = dict(root.named_modules())
    for block, precision in precision_of.items():
        top = modules.get(block)
        if top is None:
            continue
        for sub, module in list(top.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            name = f"{block}.{sub}" if block and sub else (block or sub)
            dtype = dtype_of(name)
            chosen = effective_precision(precision, module.out_features, module.in_features, group_size)
            q = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, chosen, dtype,
                                layout_of(block, dtype) if chosen == "int4" else "", group_size, device="meta",
                                bias_dtype=module.bias.dtype if module.bias is not None else None)
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, q)
            swapped[name] = q
    return swapped
