"""The FlashAttention-2 Triton kernel against a float64 softmax(QK^T) V written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
from kernel_utils import (
    DEVICE,
    nan_like,
    needs_triton,
    rel_err,
    skip_unsupported_dot_dtype,
)

import minirlhf.kernels as K
from minirlhf.kernels.attention import (
    _document_bounds,
    attention_backward_triton,
    attention_forward_triton,
    attention_torch,
)

# Relative error bounds (max abs error / max abs of the float64 result). fp32: the kernel sums in a
# different order than the reference, ~1e-7 observed. fp16 / bf16: P and dS are rounded to the input
# dtype before their matmuls (as in FlashAttention-2), ~2^-11 and ~2^-8 relative per element,
# accumulated over T keys: ~5e-4 observed for fp16 here, bounds leave ~6x headroom.
BOUNDS = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def attention_float64(q, k, v, document_ids=None):
    """softmax(Q K^T / sqrt(D) + mask) V in float64, kv heads repeated for grouped-query attention."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]  # (B, 1, T, T)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def make_documents(kind: str | None, B: int, T: int) -> torch.Tensor | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(T)
    if kind == "left_pad":  # attention_mask as document ids: row b has b*7 pads first
        return torch.stack([(torch.arange(T) >= min(b * 7, T - 1)).long() for b in range(B)])
    if kind == "packed":  # contiguous documents of random lengths, ids increasing
        rows = []
        for _ in range(B):
            cuts = torch.sort(torch.randperm(T - 1, generator=g)[:3] + 1).values
            rows.append(torch.bucketize(torch.arange(T), cuts, right=True))
        return torch.stack(rows)
    if kind == "scattered":  # ids that interleave: only same-id pairs attend, wherever they sit
        return torch.randint(0, 3, (B, T), generator=g)
    raise ValueError(kind)


CASES = [  # B, Hq, Hkv, T, D, documents, dtype
    (2, 4, 2, 70, 32, None, torch.float32),
    (1, 2, 2, 17, 16, None, torch.float32),
    (2, 4, 1, 33, 64, "left_pad", torch.float32),
    (2, 2, 2, 70, 32, "packed", torch.float32),
    (1, 4, 2, 33, 24, "scattered", torch.float32),  # head dim padded to 32 inside the kernel
    (1, 2, 1, 1, 16, None, torch.float32),
    (2, 4, 2, 70, 32, "packed", torch.float16),
    (2, 2, 1, 33, 64, "left_pad", torch.float16),
    (1, 2, 2, 17, 128, None, torch.float16),
    (2, 4, 2, 70, 64, "packed", torch.bfloat16),
    (1, 2, 1, 33, 128, None, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("B,Hq,Hkv,T,D,docs,dtype", CASES)
def test_kernel_matches_float64(B, Hq, Hkv, T, D, docs, dtype):
    skip_unsupported_dot_dtype(dtype)
    torch.manual_seed(B * 1000 + T * 10 + D)
    q = torch.randn(B, Hq, T, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, T, D, device=DEVICE).to(dtype)
    grad_out = torch.randn(B, Hq, T, D, device=DEVICE).to(dtype)
    document_ids = make_documents(docs, B, T)
    if document_ids is not None:
        document_ids = document_ids.to(DEVICE)
    scale = 1.0 / math.sqrt(D)

    # every output buffer starts as NaN: an element a kernel forgets to write fails the comparison
    out, lse = nan_like(q), torch.full((B, Hq, T), float("nan"), device=DEVICE)
    attention_forward_triton(q, k, v, document_ids, scale, out, lse)
    dq, dk, dv, delta = nan_like(q), nan_like(k), nan_like(v), nan_like(lse)
    attention_backward_triton(q, k, v, out, lse, grad_out, document_ids, scale, dq, dk, dv, delta)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_float64(q64, k64, v64, document_ids)
    ref.backward(grad_out.double())
    bound = BOUNDS[dtype]
    assert torch.isfinite(lse).all() and torch.isfinite(delta).all()
    assert rel_err(out, ref) <= bound, f"out: {rel_err(out, ref):.2e} > {bound:.0e}"
    assert rel_err(dv, v64.grad) <= bound, f"dv: {rel_err(dv, v64.grad):.2e} > {bound:.0e}"
    if T == 1:
        # one key: softmax is 1 whatever q, k are, so their true gradients are 0. The kernel's are
        # P * (dP - delta) * k with dP = dO.v and delta = dO.O = dO.v summed in another order, so they
        # are 0 only up to that rounding, which differs between CPUs (exactly 0 on some, ~1e-8 on others)
        tol = bound * dv.abs().max().item()
        assert dq.abs().max() <= tol and dk.abs().max() <= tol
        return
    assert rel_err(dq, q64.grad) <= bound, f"dq: {rel_err(dq, q64.grad):.2e} > {bound:.0e}"
    assert rel_err(dk, k64.grad) <= bound, f"dk: {rel_err(dk, k64.grad):.2e} > {bound:.0e}"
    # the saved log-sum-exp is log2-domain: lse = log2 sum_j exp(scale * q.k_j)
    group = Hq // Hkv
    scores = (q64.detach() @ k64.detach().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    allowed = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    lse_ref = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1) / math.log(2)
    assert (lse.double() - lse_ref).abs().max() <= 1e-4 * max(1.0, lse_ref.abs().max().item())


@needs_triton
def test_autograd_through_dispatch_with_strided_inputs():
    """kernels.attention(backend="triton") on q, k, v that are transposed views of [B, T, H, D] (the
    model's layout), gradients through autograd, against the float64 reference."""
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 2, 33, 4, 2, 32
    q_bthd = torch.randn(B, T, Hq, D, device=DEVICE, requires_grad=True)
    k_bthd = torch.randn(B, T, Hkv, D, device=DEVICE, requires_grad=True)
    v_bthd = torch.randn(B, T, Hkv, D, device=DEVICE, requires_grad=True)
    document_ids = make_documents("left_pad", B, T).to(DEVICE)
    out = K.attention(q_bthd.transpose(1, 2), k_bthd.transpose(1, 2), v_bthd.transpose(1, 2),
                      document_ids=document_ids, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    leaves = [x.detach().double().requires_grad_() for x in (q_bthd, k_bthd, v_bthd)]
    ref = attention_float64(*(x.transpose(1, 2) for x in leaves), document_ids)
    ref.backward(grad_out.double())
    assert rel_err(out, ref) <= BOUNDS[torch.float32]
    for got, want in zip((q_bthd, k_bthd, v_bthd), leaves):
        assert got.grad.shape == want.grad.shape
        assert rel_err(got.grad, want.grad) <= BOUNDS[torch.float32]


@needs_triton
def test_left_padding_does_not_change_a_row():
    """A left-padded row with document_ids = attention_mask gives, on its real tokens, exactly what
    the unpadded row gives alone (the property the model relies on for batched generation)."""
    torch.manual_seed(1)
    T, pad, H, D = 21, 6, 2, 16
    q, k, v = (torch.randn(1, H, T, D, device=DEVICE) for _ in range(3))
    mask = (torch.arange(T, device=DEVICE) >= pad).long()[None]  # (1, T)
    padded = K.attention(q, k, v, document_ids=mask, backend="triton")
    alone = K.attention(q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], backend="triton")
    assert rel_err(padded[:, :, pad:], alone) <= BOUNDS[torch.float32]


def test_torch_reference_matches_float64():
    """attention_torch (SDPA with a built mask / is_causal, enable_gqa) is itself checked."""
    torch.manual_seed(2)
    q = torch.randn(2, 4, 19, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 19, 8, dtype=torch.float64), torch.randn(2, 2, 19, 8, dtype=torch.float64)
    for docs in (None, "packed", "scattered", "left_pad"):
        document_ids = make_documents(docs, 2, 19)
        assert rel_err(attention_torch(q, k, v, document_ids), attention_float64(q, k, v, document_ids)) < 1e-12


def test_torch_backend_without_interpreter_env():
    """backend="torch" needs no Triton: same numbers as attention_torch, and the result is differentiable."""
    q = torch.randn(1, 2, 9, 8, requires_grad=True)
    out = K.attention(q, q, q, backend="torch")
    assert torch.equal(out, attention_torch(q, q, q))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_document_bounds_hand_derived():
    # row 0: documents 0 = {0, 1}, 1 = {2, 3, 4}; row 1 interleaves: 3 = {0, 2}, 5 = {1, 3, 4}
    document_ids = torch.tensor([[0, 0, 1, 1, 1], [3, 5, 3, 5, 5]])
    kv_start, q_end = _document_bounds(document_ids)
    assert kv_start.tolist() == [[0, 0, 2, 2, 2], [0, 1, 0, 1, 1]]
    assert q_end.tolist() == [[2, 2, 5, 5, 5], [3, 5, 3, 5, 5]]


@pytest.mark.parametrize("shapes,document_shape,message", [
    (((1, 4, 8, 16), (1, 3, 8, 16)), None, "not a multiple"),
    (((1, 2, 8, 16), (1, 2, 9, 16)), None, "decode path"),
    (((1, 2, 8, 16), (1, 2, 8, 16)), (1, 7), "document_ids must be"),
])
def test_bad_inputs_raise(shapes, document_shape, message):
    q, k = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    document_ids = torch.zeros(document_shape, dtype=torch.long) if document_shape else None
    with pytest.raises(ValueError, match=message):
        K.attention(q, k, k, document_ids=document_ids, backend="torch")
