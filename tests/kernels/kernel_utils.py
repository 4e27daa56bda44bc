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


def interpret_bf16_dots_as_float32() -> bool:
    """Make the Triton interpreter multiply bf16 tl.dot operands by their values; True once in place.

    Triton 3.8's interpreter keeps bf16 tensors as their uint16 storage and its create_dot hands numpy
    those raw bit patterns (only fp8 operands are converted), so a bf16 tl.dot returns garbage on the CPU.
    This widens each bf16 operand to float32 first: exact (a bf16 value is the upper half of a float32),
    and what a GPU's tensor cores compute (exact bf16 products, float32 accumulation). Everything else the
    kernels do (bf16 loads, casts, stores, the float32 accumulators) still runs in its real dtype.
    Applied by tests/kernels/conftest.py; a Triton whose interpreter no longer has this shape is left
    alone (False), and the bf16 cases then skip.
    """
    if not (INTERPRETING and HAS_TRITON):
        return False
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
        original = builder.create_dot
    except (ImportError, AttributeError):
        return False
    if getattr(original, "widens_bf16", False):
        return True

    def widened(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return handle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widened(a), widened(b), d, *args)

    create_dot.widens_bf16 = True
    builder.create_dot = create_dot
    return True


def skip_unsupported_dot_dtype(dtype: torch.dtype) -> None:
    """bf16 kernels that use tl.dot run on a GPU, or in the interpreter once
    `interpret_bf16_dots_as_float32` is in place (conftest.py); skip them otherwise."""
    if dtype == torch.bfloat16 and INTERPRETING and DEVICE.type != "cuda" and not interpret_bf16_dots_as_float32():
        pytest.skip("this Triton's interpreter computes bf16 tl.dot on raw bits; bf16 attention is checked on CUDA")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64. NaN anywhere gives NaN (fails any bound)."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any():
        return float("nan")
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer with x's shape and strides: a kernel that leaves any element unwritten fails."""
    return torch.full_like(x, float("nan"))
