"""Shared helpers for the kernel tests (imported by name: pytest puts this folder on sys.path).

`make test-kernels` runs this directory with TRITON_INTERPRET=1, so the Triton kernels execute on the
CPU through the interpreter; on a CUDA machine the same tests run the compiled kernels.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_RUNNABLE = HAS_TRITON and (INTERPRETING or DEVICE.type == "cuda")

needs_triton = pytest.mark.skipif(
    not TRITON_RUNNABLE, reason="Triton path needs CUDA or TRITON_INTERPRET=1 (make test-kernels sets it)"
)


def skip_unsupported_dot_dtype(dtype: torch.dtype) -> None:
    """The Triton 3.x interpreter multiplies bf16 tl.dot operands as their raw uint16 bit patterns
    (runtime/interpreter.py create_dot hands numpy the bf16 storage), so bf16 kernels that use tl.dot
    can only be checked on a GPU."""
    if dtype == torch.bfloat16 and INTERPRETING and DEVICE.type != "cuda":
        pytest.skip("the Triton interpreter computes bf16 tl.dot on raw bits; bf16 attention is checked on CUDA")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64. NaN anywhere gives NaN (fails any bound)."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any():
        return float("nan")
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer with x's shape and strides: a kernel that leaves any element unwritten fails."""
    return torch.full_like(x, float("nan"))
