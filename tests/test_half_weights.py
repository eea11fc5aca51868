"""HalfWeightLinear: bf16 weights decode one row in bf16 and compute a prefill's many rows in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.cosyvoice.half_weights import HalfWeightLinear, use_half_weight_linears


def _layer() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    return use_half_weight_linears(block)


def test_swap_keeps_parameters_and_keys():
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    block = _layer()
    assert [type(m) for m in block] == [HalfWeightLinear, nn.ReLU, HalfWeightLinear]
    assert list(block.state_dict()) == list(plain.state_dict())


def test_many_rows_on_cpu_compute_in_fp32_from_the_half_weights():
    layer = _layer()[0].to(torch.bfloat16)
    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_one_row_runs_in_the_weights_dtype():
    layer = _layer()[0].to(torch.bfloat16)
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_fp32_weights_are_untouched():
    layer = _layer()[0]
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
