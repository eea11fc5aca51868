"""dtype policy as a table: requested x device / compute capability -> resolved (and fallbacks)."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.policy.dtypes import choose_dtype, resolve_dtype, torch_dtype

# (requested, device, compute capability, cpu has native bf16) -> (dtype, fell back)
TABLE = [
    ("auto", "cuda", (6, 1), False, "fp32", False),
    ("auto", "cuda", (7, 0), False, "fp16", False),
    ("auto", "cuda", (7, 5), False, "fp16", False),
    ("auto", "cuda", (8, 6), False, "bf16", False),
    ("auto", "cuda", (8, 9), False, "bf16", False),
    ("auto", "cuda", (9, 0), False, "bf16", False),
    ("bf16", "cuda", (6, 1), False, "fp32", True),
    ("bf16", "cuda", (7, 0), False, "fp16", True),
    ("bf16", "cuda", (7, 5), False, "fp16", True),
    ("bf16", "cuda", (8, 6), False, "bf16", False),
    ("bf16", "cuda", (9, 0), False, "bf16", False),
    ("fp16", "cuda", (6, 1), False, "fp16", False),
    ("fp16", "cuda", (7, 5), False, "fp16", False),
    ("fp16", "cuda", (8, 9), False, "fp16", False),
    ("fp32", "cuda", (6, 1), False, "fp32", False),
    ("fp32", "cuda", (9, 0), False, "fp32", False),
    ("auto", "cuda", None, False, "fp32", True),
    ("auto", "cpu", None, False, "fp32", False),
    ("auto", "cpu", None, True, "fp32", False),  # even with native bf16: convs measured slower
    ("fp32", "cpu", None, True, "fp32", False),
    ("bf16", "cpu", None, True, "bf16", False),
    ("bf16", "cpu", None, False, "fp32", True),
    ("fp16", "cpu", None, False, "fp16", False),
]


@pytest.mark.parametrize("requested, device, cc, cpu_bf16, expected, fell_back", TABLE)
def test_dtype_table(requested, device, cc, cpu_bf16, expected, fell_back):
    choice = choose_dtype(requested, device, cc, cpu_bf16)
    assert (choice.dtype, choice.fell_back) == (expected, fell_back)
    assert choice.reason
    assert resolve_dtype(requested, device, cc, cpu_bf16) == expected


def test_fallback_reason_names_the_limit():
    reason = choose_dtype("bf16", "cuda", (7, 5)).reason
    assert "8.0" in reason and "7.5" in reason and "fp16" in reason


def test_torch_dtype_names_and_aliases():
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    assert torch_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="allowed"):
        torch_dtype("int8")
    with pytest.raises(ValueError, match="allowed"):
        choose_dtype("fp8", "cpu")
