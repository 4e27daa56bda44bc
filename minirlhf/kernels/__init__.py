"""Kernel dispatch: the model and the stages call these three functions, never a backend directly.

backend="auto" runs the Triton kernel when the tensors live on CUDA, or on the CPU under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is first imported), and the plain-torch path
otherwise. "triton" forces the kernel (and raises if it cannot run), "torch" forces the torch path:
SDPA for attention, and for the LM-head losses the same chunk loop as the kernel with torch ops for the
rows (`*_chunked`), so that no path holds the [N, V] logits.

Under autocast the three functions behave like torch's own matmul and attention ops do there: their
floating-point inputs are cast to the autocast dtype first (bf16 under `[train] precision`), so both
backends compute in the same precision and see one dtype, whatever dtype the weights are stored in.
The LM-head weight is cast inside the loss's autograd Function rather than before it, so its gradient
leaves the Function in the weight's own dtype (the float32 sum over chunks, not rounded to bf16 and
copied back to float32 by the cast's backward: two fewer passes over [V, H] a step).
The kernel modules (flash_attention.py, fused_cross_entropy.py: each Triton op beside its torch reference)
import triton inside a try, so minirlhf runs where triton is not installed.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from minirlhf.kernels.flash_attention import (
    attention_torch,
    attention_triton,
    check_attention_inputs,
)
from minirlhf.kernels.fused_cross_entropy import (
    _REDUCTIONS,
    check_linear_inputs,
    linear_cross_entropy_chunked,
    linear_cross_entropy_triton,
    linear_logprobs_chunked,
    linear_logprobs_triton,
)

_BACKENDS = ("auto", "triton", "torch")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, None when autocast is off there."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The floating-point tensors cast to the autocast dtype when autocast is on for their device (as
    autocast casts a matmul's or SDPA's operands), unchanged otherwise; integer tensors pass through."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _use_triton(backend: str, device: torch.device, op: str) -> bool:
    """Decide the backend for one call; errors name the op and the reason."""
    if backend not in _BACKENDS:
        raise ValueError(f"kernels.{op}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    has_triton = importlib.util.find_spec("triton") is not None
    runnable = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError(f"kernels.{op}: backend='triton' but triton is not installed "
                               "(pip install 'minirlhf[triton]')")
        if not runnable:
            raise RuntimeError(f"kernels.{op}: backend='triton' needs CUDA tensors or TRITON_INTERPRET=1, "
                               f"got tensors on {device}")
        return True
    return has_triton and runnable


def _labelled_rows(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab_size: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Check the labels and keep only the rows that have one: a prompt, padding or an unanswered
    position needs no logits, so the LM head (2 * V * H FLOPs a row forward, twice that backward) skips
    them. transformers computes them and masks the loss; in an sft batch with a quarter of prompt tokens
    that is a quarter of the head's work saved. The gradient of the skipped rows is 0, as it was.

    hidden: [N, H], labels: [N] -> (kept [N] bool or None when every row is labelled, hidden [n, H],
    labels [n]). Raises ValueError for a label outside [0, vocab_size) other than ignore_index. Both
    questions (any bad label? how many kept?) come back from the device in one read.
    """
    kept = labels != ignore_index
    out_of_range = kept & ((labels < 0) | (labels >= vocab_size))
    n_kept, n_bad = torch.stack([kept.sum(), out_of_range.sum()]).tolist()  # the one host sync
    if n_bad:
        raise ValueError(f"kernels.cross_entropy: label {int(labels[out_of_range][0])} out of range for "
                         f"vocab_size {vocab_size} (ignore_index={ignore_index})")
    if n_kept == len(labels):
        return None, hidden, labels
    rows = torch.nonzero_static(kept, size=n_kept)[:, 0]  # (n,); nonzero() would read its size back again
    return kept, hidden.index_select(0, rows), labels.index_select(0, rows)


def _scatter_rows(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """values [n] of the kept rows back at their places in [N] (kept: [N] bool), 0 elsewhere
    (differentiable)."""
    return values.new_zeros(kept.shape).masked_scatter(kept, values)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
    backend: str = "auto", scale: float | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention. q: [B, Hq, T, D], k, v: [B, Hkv, T, D] (Hq a multiple of Hkv),
    document_ids: [B, T] int or None (query i sees key j iff j <= i and both are in one document;
    left padding is document_ids = attention_mask). scale defaults to 1/sqrt(D). Returns [B, Hq, T, D]."""
    q, k, v = _autocast_inputs(q, k, v)
    check_attention_inputs(q, k, v, document_ids)
    if _use_triton(backend, q.device, "attention"):
        return attention_triton(q, k, v, document_ids, scale)
    return attention_torch(q, k, v, document_ids, scale)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels. hidden: [N, H], weight: [V, H],
    labels: [N]. reduction "mean" (over non-ignored tokens) | "sum" -> scalar fp32; "none" -> [N] fp32."""
    hidden, = _autocast_inputs(hidden)  # the weight is cast inside the autograd Function (its dW stays float32)
    check_linear_inputs(hidden, weight, labels, autocast_dtype(hidden.device.type))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"kernels.linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    fn = (linear_cross_entropy_triton if _use_triton(backend, hidden.device, "linear_cross_entropy")
          else linear_cross_entropy_chunked)
    kept, hidden, labels = _labelled_rows(hidden, labels, ignore_index, weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):  # the chunks' matmuls write into their buffers
        loss = fn(hidden, weight, labels, ignore_index, reduction)
    return loss if reduction != "none" or kept is None else _scatter_rows(loss, kept)


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    backend: str = "auto", ignore_index: int = -100,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[label] per token. hidden: [N, H], weight: [V, H],
    labels: [N] -> [N] fp32, 0 where labels == ignore_index. Differentiable w.r.t. hidden and weight."""
    hidden, = _autocast_inputs(hidden)  # the weight is cast inside the autograd Function (its dW stays float32)
    check_linear_inputs(hidden, weight, labels, autocast_dtype(hidden.device.type))
    if not temperature > 0:
        raise ValueError(f"kernels.linear_logprobs: temperature must be > 0, got {temperature}")
    fn = linear_logprobs_triton if _use_triton(backend, hidden.device, "linear_logprobs") else linear_logprobs_chunked
    kept, hidden, labels = _labelled_rows(hidden, labels, ignore_index, weight.shape[0])
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs = fn(hidden, weight, labels, temperature, ignore_index)
    return logprobs if kept is None else _scatter_rows(logprobs, kept)


__all__ = ["attention", "autocast_dtype", "linear_cross_entropy", "linear_logprobs"]
