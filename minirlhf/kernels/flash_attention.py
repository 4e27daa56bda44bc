"""Causal attention: a FlashAttention-2 Triton kernel (forward and backward) and its plain-torch reference.

Both compute, for every batch row b and query head h (kv head h // G for G = Hq / Hkv, grouped-query):

    S = scale * Q K^T                                   S: [T, T]
    S_ij = -inf unless j <= i and doc[b, i] == doc[b, j]
    O = softmax(S) V                                    O: [T, D]

The kernel follows FlashAttention-2 (Dao, 2023, arXiv:2307.08691): Algorithm 1 for the forward (online
softmax over key blocks, one program per query block, the [T, T] matrix never exists; Sec. 3.1.1), and
Algorithm 2 for the backward (P recomputed from the saved row log-sum-exp L; Sec. 3.1.2):

    P_ij = exp(S_ij - L_i)          dV = P^T dO          dP = dO V^T
    delta_i = rowsum(dO_i * O_i)    dS = P * (dP - delta)      dQ = scale * dS K     dK = scale * dS^T Q

After a small kernel computes delta, two kernels avoid atomics: one program per key block accumulates
dK, dV over the query blocks (and over the G query heads sharing that kv head), another per query block
accumulates dQ.
Exponentials use exp2 with log2(e) folded into the scale, as the Triton fused-attention tutorial does.

Each program first walks the blocks that need no causal mask, then the diagonal blocks with the mask.
With document_ids (packed documents, or left padding given as the attention mask) a query block starts
at the first key that can share a document with any of its rows, so packed sequences skip the blocks
of earlier documents (`_document_bounds`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference stays usable; kernels/__init__.py never dispatches to Triton then
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


def attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-torch causal attention (SDPA), the reference for the kernel and the CPU path.

    q: [B, Hq, T, D], k, v: [B, Hkv, T, D], document_ids: [B, T] int or None. Returns [B, Hq, T, D].
    With document_ids the mask is built explicitly ([B, 1, T, T] bool), otherwise SDPA's is_causal.
    """
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    mask = (causal & same_doc)[:, None]  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position, the first and one-past-last position holding the same document id.

    document_ids: [B, T] -> kv_start [B, T] int32 (no key before it can match), q_end [B, T] int32 (no
    query at or after it can match). Ids need not be sorted or contiguous; the kernel still masks
    exactly, these bounds only let it skip blocks.
    """
    B, T = document_ids.shape
    pos = torch.arange(T, device=document_ids.device).expand(B, T)
    rows = torch.arange(B, device=document_ids.device)[:, None].expand(B, T)
    pairs = torch.stack([rows.reshape(-1), document_ids.reshape(-1).long()], dim=1)  # (B*T, 2)
    _, inverse = torch.unique(pairs, dim=0, return_inverse=True)  # one slot per (row, document)
    n = int(inverse.max()) + 1
    flat_pos = pos.reshape(-1)
    first = torch.full((n,), T, dtype=torch.long, device=pos.device).scatter_reduce(0, inverse, flat_pos, "amin")
    last = torch.full((n,), -1, dtype=torch.long, device=pos.device).scatter_reduce(0, inverse, flat_pos, "amax")
    kv_start = first[inverse].view(B, T).to(torch.int32)
    q_end = (last[inverse] + 1).view(B, T).to(torch.int32)
    return kv_start, q_end


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _row_mask(offs, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask for a [rows, BLOCK_D] tile: rows < T, and columns < HEAD_DIM only when the head dim is
    padded (a [rows, 1] mask is constant along the row, so loads stay vectorized)."""
    mask = offs[:, None] < T
    if BLOCK_D != HEAD_DIM:
        mask = mask & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
    return mask


@_jit
def _fwd_inner(
    acc, m_i, l_i, q, offs_m, doc_q, k_ptrs, v_ptrs, doc_ptr, stride_kt, stride_vt,
    start, stop, T, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [start, stop): FlashAttention-2 Algorithm 1, lines 6-10."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = _row_mask(offs_n, T, HEAD_DIM, BLOCK_D)
        k = tl.load(k_ptrs + offs_n[:, None] * stride_kt, mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vt, mask=kv_mask, other=0.0)  # (BN, BD)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BM, BN), log2 units
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if HAS_DOCS:
            doc_k = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-1)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key in this block
        p = tl.exp2(s - m_safe[:, None])  # (BM, BN)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@_jit
def _attn_fwd(
    Q, K, V, O, LSE, DOC, KV_START,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, T_BUCKET, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one query block of one (batch, query head). Writes O: [B, H, T, D], LSE: [B, H, T]
    (log2-domain row log-sum-exp of the scaled scores, what the backward needs to recompute P)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _row_mask(offs_m, T, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)  # (BM, BD)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_d[None, :]

    lo = 0
    doc_q = offs_m  # unused without documents
    if HAS_DOCS:
        doc_q = tl.load(DOC + b * T + offs_m, mask=offs_m < T, other=-1)
        first = tl.min(tl.load(KV_START + b * T + offs_m, mask=offs_m < T, other=T), 0)
        lo = (first // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys before the block's first query: every (query, key) pair is causal, no mask needed
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, offs_m, doc_q, k_ptrs, v_ptrs, DOC + b * T,
                               stride_kt, stride_vt, lo, start_m, T, qk_scale,
                               BLOCK_N, BLOCK_D, HEAD_DIM, False, HAS_DOCS, DOT_PRECISION)
    # the diagonal block(s)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, offs_m, doc_q, k_ptrs, v_ptrs, DOC + b * T,
                               stride_kt, stride_vt, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                               BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_DOCS, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past T (never stored) can have l == 0
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=offs_m < T)


@_jit
def _attn_bwd_delta(
    O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id (FlashAttention-2, Algorithm 2 line 4). DELTA: [B, H, T] fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _row_mask(offs_m, T, HEAD_DIM, BLOCK_D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@_jit
def _bwd_dkdv_inner(
    dk, dv, k, v, offs_n, doc_k, q_ptrs, do_ptrs, lse_ptr, delta_ptr, doc_ptr, stride_qt, stride_dot,
    start, stop, T, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [start, stop) (transposed tiles: [BN, BM])."""
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = _row_mask(offs_m, T, HEAD_DIM, BLOCK_D)
        q = tl.load(q_ptrs + offs_m[:, None] * stride_qt, mask=q_mask, other=0.0)  # (BM, BD)
        do = tl.load(do_ptrs + offs_m[:, None] * stride_dot, mask=q_mask, other=0.0)  # (BM, BD)
        # lse = +inf past T makes P = 0 there without another mask
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < T, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BN, BM)
        if CAUSAL_MASK:
            s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
        if HAS_DOCS:
            doc_q = tl.load(doc_ptr + offs_m, mask=offs_m < T, other=-1)
            s_t = tl.where(doc_k[:, None] == doc_q[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # (BN, BM)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@_jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, Q_END,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, HK, T, T_BUCKET, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one key block of one (batch, kv head); sums over the GROUP query heads it serves."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // HK).to(tl.int64)
    hk = (bh % HK).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = _row_mask(offs_n, T, HEAD_DIM, BLOCK_D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (BN, BD)

    hi = T
    doc_k = offs_n  # unused without documents
    if HAS_DOCS:
        doc_k = tl.load(DOC + b * T + offs_n, mask=offs_n < T, other=-2)
        hi = tl.max(tl.load(Q_END + b * T + offs_n, mask=offs_n < T, other=0), 0)
    diag_end = tl.minimum(start_n + BLOCK_N, hi)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
        do_ptrs = DO + b * stride_dob + h * stride_doh + offs_d[None, :]
        row = (b * H + h) * T
        # the diagonal block(s): queries that see only part of this key block
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, doc_k, q_ptrs, do_ptrs, LSE + row, DELTA + row,
                                 DOC + b * T, stride_qt, stride_dot, start_n, diag_end, T, qk_scale,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, True, HAS_DOCS, DOT_PRECISION)
        # later queries see the whole key block
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, doc_k, q_ptrs, do_ptrs, LSE + row, DELTA + row,
                                 DOC + b * T, stride_qt, stride_dot, start_n + BLOCK_N, hi, T, qk_scale,
                                 BLOCK_M, BLOCK_D, HEAD_DIM, False, HAS_DOCS, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, offs_m, doc_q, k_ptrs, v_ptrs, doc_ptr, stride_kt, stride_vt,
    start, stop, T, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_DOCS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [start, stop)."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = _row_mask(offs_n, T, HEAD_DIM, BLOCK_D)
        k = tl.load(k_ptrs + offs_n[:, None] * stride_kt, mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vt, mask=kv_mask, other=0.0)  # (BN, BD)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BM, BN)
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if HAS_DOCS:
            doc_k = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-1)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@_jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, KV_START,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    H, T, T_BUCKET, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one query block of one (batch, query head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _row_mask(offs_m, T, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_d[None, :]

    lo = 0
    doc_q = offs_m
    if HAS_DOCS:
        doc_q = tl.load(DOC + b * T + offs_m, mask=offs_m < T, other=-1)
        first = tl.min(tl.load(KV_START + b * T + offs_m, mask=offs_m < T, other=T), 0)
        lo = (first // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, offs_m, doc_q, k_ptrs, v_ptrs, DOC + b * T, stride_kt, stride_vt,
                       lo, start_m, T, qk_scale, BLOCK_N, BLOCK_D, HEAD_DIM, False, HAS_DOCS, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, offs_m, doc_q, k_ptrs, v_ptrs, DOC + b * T, stride_kt, stride_vt,
                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                       BLOCK_N, BLOCK_D, HEAD_DIM, True, HAS_DOCS, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# Block sizes. On a GPU the autotuner picks among the configs below (H100: 228 KB shared memory a
# block; a (128, 128) fp16 K/V tile pair is 64 KB, so two or three pipeline stages fit). The forward and
# dQ kernels need BLOCK_M % BLOCK_N == 0, the dK/dV kernel BLOCK_N % BLOCK_M == 0, so that the diagonal
# and off-diagonal loops split on block edges. Like the Triton tutorial: wide query blocks in the
# forward / dQ (each K/V tile is reused by many rows), wide key blocks in dK/dV. The interpreter
# (TRITON_INTERPRET=1) gets one small fixed config: it has no timer and is slow per program.
_INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _autotune_configs(kind: str) -> list:
    if kind == "fwd":
        shapes = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]
    elif kind == "dkdv":
        shapes = [(32, 64), (32, 128), (64, 64), (64, 128)]
    else:
        shapes = [(64, 32), (64, 64), (128, 32), (128, 64)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in shapes for w in (4, 8) for s in (2, 3, 4)
    ]


def _prune_for_head_dim(configs: list, named_args: dict, **kwargs) -> list:
    """Drop the largest tiles for head dim >= 128: their register footprint spills on H100."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    if head_dim < 128:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
    return small or configs


_AUTOTUNE_KEY = ["T_BUCKET", "HEAD_DIM", "GROUP", "HAS_DOCS", "DOT_PRECISION"]
if triton is not None:
    _attn_fwd_tuned = triton.autotune(
        _autotune_configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim}
    )(_attn_fwd)
    _attn_bwd_dkdv_tuned = triton.autotune(
        _autotune_configs("dkdv"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim}
    )(_attn_bwd_dkdv)
    _attn_bwd_dq_tuned = triton.autotune(
        _autotune_configs("dq"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_for_head_dim}
    )(_attn_bwd_dq)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(tuned, plain, kind: str, grid_fn, *args, **kwargs) -> None:
    """Run the autotuned kernel on a GPU, or the plain one with the interpreter's fixed blocks."""
    if _interpreting():
        bm, bn = _INTERPRET_BLOCKS[kind]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        plain[grid_fn(meta)](*args, **kwargs, **meta)
    else:
        tuned[grid_fn](*args, **kwargs)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q: torch.Tensor, k: torch.Tensor, document_ids: torch.Tensor | None) -> dict:
    D = q.shape[-1]
    return {
        "GROUP": q.shape[1] // k.shape[1], "HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D)),
        "HAS_DOCS": document_ids is not None,
        # fp32 inputs get true fp32 products (tl.dot would otherwise use TF32 on tensor cores)
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _document_args(
    q: torch.Tensor, document_ids: torch.Tensor | None, bounds: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """int32 document ids and their (kv_start, q_end) bounds; without documents a 1-element int32
    placeholder stands in for each (the kernels never read it when HAS_DOCS is False)."""
    if document_ids is None:
        placeholder = torch.zeros(1, dtype=torch.int32, device=q.device)
        return placeholder, (placeholder, placeholder)
    doc = document_ids.to(device=q.device, dtype=torch.int32).contiguous()
    return doc, bounds if bounds is not None else _document_bounds(doc)


def attention_forward_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None, scale: float,
    out: torch.Tensor, lse: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the forward kernel. q: [B, Hq, T, D], k, v: [B, Hkv, T, D] (last dim contiguous).
    Writes out: [B, Hq, T, D] and lse: [B, Hq, T] fp32 (log2 domain). bounds = _document_bounds(doc)."""
    B, H, T, _ = q.shape
    doc, (kv_start, _) = _document_args(q, document_ids, bounds)
    _launch(
        _attn_fwd_tuned, _attn_fwd, "fwd", lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H),
        q, k, v, out, lse, doc, kv_start,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, T, triton.next_power_of_2(T), scale * _LOG2E, **_meta(q, k, document_ids),
    )


def attention_backward_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, document_ids: torch.Tensor | None, scale: float,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, delta: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the three backward kernels; writes dq [B, Hq, T, D], dk, dv [B, Hkv, T, D] and the
    scratch delta [B, Hq, T] fp32."""
    B, H, T, D = q.shape
    HK = k.shape[1]
    doc, (kv_start, q_end) = _document_args(q, document_ids, bounds)
    meta = _meta(q, k, document_ids)
    block_m = 64 if not _interpreting() else 16
    _attn_bwd_delta[(triton.cdiv(T, block_m), B * H)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], H, T,
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=block_m,
    )
    strides_in = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    qk_scale = scale * _LOG2E
    _launch(
        _attn_bwd_dkdv_tuned, _attn_bwd_dkdv, "dkdv", lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * HK),
        q, k, v, grad_out, lse, delta, dk, dv, doc, q_end,
        *strides_in, *dk.stride()[:3], *dv.stride()[:3], H, HK, T, triton.next_power_of_2(T), qk_scale, scale,
        **meta,
    )
    _launch(
        _attn_bwd_dq_tuned, _attn_bwd_dq, "dq", lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H),
        q, k, v, grad_out, lse, delta, dq, doc, kv_start,
        *strides_in, *dq.stride()[:3], H, T, triton.next_power_of_2(T), qk_scale, scale, **meta,
    )


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the row log-sum-exp (O(B*H*T) extra), never P."""

    @staticmethod
    def forward(ctx, q, k, v, document_ids, scale):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        B, H, T, D = q.shape
        bounds = _document_bounds(document_ids) if document_ids is not None else None
        out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        attention_forward_triton(q, k, v, document_ids, scale, out, lse, bounds)
        ctx.save_for_backward(q, k, v, out, lse, document_ids, *(bounds or ()))
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, document_ids, *bounds = ctx.saved_tensors
        grad_out = _last_dim_contiguous(grad_out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        attention_backward_triton(q, k, v, out, lse, grad_out, document_ids, ctx.scale, dq, dk, dv, delta,
                                  tuple(bounds) or None)
        return dq, dk, dv, None, None


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None
) -> None:
    """Raise ValueError naming the offending argument when shapes or dtypes do not fit the contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels.attention: q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"kernels.attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"kernels.attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T, D "
                         "(the KV-cache decode path, q shorter than k, stays on SDPA in model.py)")
    if H % k.shape[1] != 0:
        raise ValueError(f"kernels.attention: {H} query heads is not a multiple of {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"kernels.attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if document_ids is not None:
        if document_ids.shape != (B, T):
            raise ValueError(f"kernels.attention: document_ids must be [B, T] = {(B, T)}, "
                             f"got {tuple(document_ids.shape)}")
        if document_ids.is_floating_point() or document_ids.is_complex():
            raise ValueError(f"kernels.attention: document_ids must be an integer tensor, got {document_ids.dtype}")


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal (and document-masked) attention through the Triton kernel. Shapes as attention_torch."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kernels.attention: Triton path supports fp16/bf16/fp32, got {q.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return TritonAttention.apply(q, k, v, document_ids, scale)
