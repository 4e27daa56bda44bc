"""Fused LM head + cross-entropy / label log-probs that never hold the full [N, V] logits.

For hidden states h: [N, H], LM head W: [V, H], labels y: [N] and a temperature tau:

    z_n = W h_n / tau                                    (one row of logits)
    logp_n = z_n[y_n] - logsumexp(z_n)                    (the label's log-prob)
    CE = -(1/|valid|) sum_n logp_n  (mean)   or   -sum_n logp_n  (sum)

and the gradient of logp_n with respect to its logits (softmax cross-entropy, e.g. Bishop 2006, eq. 4.109):

    d logp_n / d z_n = onehot(y_n) - softmax(z_n)
    dh_n = (1/tau) W^T (c_n (softmax(z_n) - onehot(y_n))),   dW = (1/tau) sum_n c_n (softmax(z_n) - onehot(y_n)) h_n^T

with a per-row scale c_n: 1/|valid| (mean), 1 (sum) or -g_n (an upstream gradient g_n on logp_n).
Ignored rows (y_n == ignore_index) have logp_n = 0 and c_n = 0.

The host loops over chunks of C tokens: one matmul makes the chunk's logits [C, V], one Triton program
per row takes an online log-sum-exp over V (Milakov & Gimelshein 2018, "Online normalizer calculation
for softmax", Algorithm 3) and, when asked, overwrites the chunk in place with c_n (softmax - onehot) / tau,
which two more matmuls turn into dh (rows of the chunk) and dW (accumulated).

Where the gradient is computed:
- `linear_cross_entropy` (mean / sum): the upstream gradient is one scalar, so dh and dW are computed in the
  forward and scaled in the backward (as Liger-Kernel does): 3 matmuls in all, like the unfused
  logits + cross_entropy (1 forward, 2 backward), and the logits are never recomputed.
- `linear_logprobs` (dpo, kto, ppo): each token's log-prob gets its own upstream gradient g_n, unknown in
  the forward. dh could be precomputed as a per-row vector scaled by g_n later, but dW = sum_n g_n (...) h_n^T
  cannot without storing [N, V]. So the forward keeps only the row log-sum-exp (4 bytes a token) and the
  backward recomputes each chunk's logits: 4 matmuls in all (one more than unfused) for O(N) saved memory.

The same chunk loop and autograd Functions run without Triton (backend "torch", the CPU path): the row
kernel's work is then one fused softmax or log-softmax over the chunk (`_ce_chunk_torch`), with smaller
chunks (`cpu_chunk_size`) and dW accumulated in float32 when the weight is bf16/fp16. Neither path ever holds
more than one chunk of logits; `linear_*_torch` below are the unchunked references the tests compare with.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference stays usable; kernels/__init__.py never dispatches to Triton then
    triton = None
    tl = None

_REDUCTIONS = ("mean", "sum", "none")


def _valid_and_safe(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = labels != ignore_index
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def linear_logprobs_torch(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Reference: log softmax(hidden @ weight.T / temperature)[label] in fp32, 0 at ignore_index.
    hidden: [N, H], weight: [V, H], labels: [N] -> [N] fp32. Holds the full [N, V] logits."""
    logits = (hidden @ weight.T).float() / temperature  # (N, V)
    valid, safe = _valid_and_safe(labels, ignore_index)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe[:, None])[:, 0]
    return torch.where(valid, logp, torch.zeros_like(logp))


def linear_cross_entropy_torch(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference: F.cross_entropy on fp32 logits = hidden @ weight.T. hidden: [N, H], weight: [V, H]."""
    logits = (hidden @ weight.T).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _ce_rows_kernel(
    LOGITS, stride_row, LABELS, ROW_SCALE, LSE, LOGPROB, V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program = one row of a logits chunk [C, V].

    COMPUTE_LSE: online log-sum-exp over V (writes LSE and LOGPROB); otherwise LSE is read (backward).
    WRITE_GRAD: overwrite the row with ROW_SCALE[row] * (softmax - onehot(label)) * inv_temp.
    """
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    if COMPUTE_LSE:
        m = tl.full([], float("-inf"), dtype=tl.float32)
        s = tl.full([], 0.0, dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32) * inv_temp
        tl.store(LSE + row, lse)
        tl.store(LOGPROB + row, tl.where(valid, target - lse, 0.0))
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        c = tl.load(ROW_SCALE + row).to(tl.float32) * inv_temp
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * c
            tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


def _ce_chunk_torch(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logits_buf: torch.Tensor,
    wide_buf: torch.Tensor | None, *, inv_temperature: float, ignore_index: int, lse: torch.Tensor,
    logprob: torch.Tensor | None, row_scale: torch.Tensor | None, grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> None:
    """One chunk of `fused_linear_pass` in torch ops: what `_ce_rows_kernel` and the matmuls around it do.

    hidden: [C, H], labels, lse, logprob, row_scale: [C], logits_buf: [C, V] in hidden's dtype,
    wide_buf: [C, V] float32 scratch for the log-softmax of a bf16/fp16 chunk (None otherwise),
    grad_hidden: [C, H] (overwritten), grad_weight: [V, H] (accumulated).

    A CPU is bound by the passes over the [C, V] chunk (a bf16 elementwise pass over 672 x 49152 logits
    costs about as much as one of its matmuls), so each step is one fused kernel: log_softmax (float32
    statistics, written as float32) for the log-probs, softmax written over the chunk in its own dtype for
    the gradient, and the per-row scale c_n / tau applied to the [C, H] rows of h (for dW) and of dh, never
    to the [C, V] chunk:
        dh_n = (c_n / tau) (p_n - onehot_n) W,   dW = sum_n (p_n - onehot_n) (c_n / tau) h_n^T
    with p_n = softmax(W h_n / tau), computed as softmax(W (h_n / tau)).
    """
    wide = torch.promote_types(hidden.dtype, torch.float32)
    if inv_temperature != 1.0:
        hidden = hidden * inv_temperature  # z / tau = (h / tau) W^T: scale the [C, H] rows, not the logits
    logits = torch.mm(hidden, weight.T, out=logits_buf)  # (C, V)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)[:, None]  # (C, 1)
    probs = None
    if logprob is not None:
        target = logits.gather(1, safe)[:, 0].to(wide)  # read before the chunk is overwritten
        if wide_buf is None:  # float32 / float64 chunk: log-softmax in place, exp gives the softmax back
            log_probs = torch.log_softmax(logits, -1, out=logits)
        else:
            # copied, then in place: log_softmax(dtype=float32) would hold one more float32 copy of the chunk
            log_probs = torch.log_softmax(wide_buf.copy_(logits), -1, out=wide_buf)
        label_logp = log_probs.gather(1, safe)[:, 0]
        lse.copy_(target - label_logp)
        logprob.copy_(torch.where(valid, label_logp, 0.0))
        if row_scale is not None and wide_buf is None:
            probs = log_probs.exp_()
    if row_scale is None:
        return
    if probs is None:
        probs = torch.softmax(logits, -1, out=logits)  # in place, float32 statistics; the saved lse not needed
    # - onehot(label) (ignored rows get c = 0); at C places, not scatter_add_, which copies a bf16 chunk whole
    at_label = torch.arange(probs.shape[0], device=probs.device) * probs.shape[1] + safe[:, 0]
    flat = probs.view(-1)
    flat.index_copy_(0, at_label, flat.index_select(0, at_label) - 1)
    scale = row_scale.to(wide)[:, None]  # (C, 1)
    if grad_hidden is not None:
        torch.mm(probs, weight, out=grad_hidden).mul_(scale * inv_temperature)
    if grad_weight is not None:
        scaled_rows = (hidden.to(wide) * scale).to(hidden.dtype)  # (C, H): c_n h_n / tau
        _add_grad_weight(grad_weight, probs, scaled_rows, vocab_slice=8192)  # no [V, H] temporaries on a CPU


def _add_grad_weight(grad_weight: torch.Tensor, grad_logits: torch.Tensor, rows: torch.Tensor,
                     vocab_slice: int | None = None) -> None:
    """grad_weight [V, H] += grad_logits^T rows, for one chunk: grad_logits [C, V], rows [C, H].

    In grad_weight's dtype: when it is wider than the chunk (a float32 sum of bf16 chunks, see
    `_grad_weight_buffer`) each chunk's product is rounded once and added, `vocab_slice` vocabulary rows
    at a time if given (so that no [V, H] product and float32 copy of it exist at once); otherwise the
    matmul adds straight into it.
    """
    if grad_weight.dtype == grad_logits.dtype:  # one rounding a chunk; the matmul itself sums in fp32
        grad_weight.addmm_(grad_logits.T, rows)
        return
    step = vocab_slice or grad_logits.shape[1]
    for v in range(0, grad_logits.shape[1], step):
        grad_weight[v:v + step] += torch.mm(grad_logits[:, v:v + step].T, rows).to(grad_weight.dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk C.

    Memory: the chunk's logits [C, V] are the only transient, C*V*2 bytes in bf16. Choosing
    C ~ N*H/V makes that no larger than the hidden-state gradient [N, H] the op must return anyway
    (Liger-Kernel uses the same rule), so peak memory stays O(N*H + V*H) instead of the unfused
    ~10*N*V bytes (bf16 logits + their fp32 copy + fp32 log-softmax saved for the backward).
    Speed: a [C, H] x [H, V] matmul does 2*C*H*V FLOPs over ~2*V*H bytes of W, C FLOPs a byte; an H100
    needs ~300 FLOP/B (990 TFLOP/s / 3.35 TB/s) to be compute bound, so C is never below 1024.
    Example (N=16k, H=4096, V=128k): N*H/V = 512 -> C = 1024, a 256 MB chunk against ~20 GB of unfused
    logits; dW accumulates over N/C = 16 chunks.
    """
    by_memory = 1 << (max(1, -(-n_tokens * hidden_size // vocab_size)) - 1).bit_length()  # next power of 2
    return max(1, min(n_tokens, max(1024, by_memory)))


TORCH_CHUNK_BYTES = 192 << 20  # what one chunk of the torch path may hold, see cpu_chunk_size


def cpu_chunk_size(n_tokens: int, vocab_size: int, bytes_per_logit: int = 4, budget_bytes: int = 128 << 20) -> int:
    """Tokens per chunk on the torch path: as many as fit `budget_bytes` at `bytes_per_logit` bytes for
    each of the chunk's [C, V] logits, a multiple of 16, at least 16, at most n_tokens.

    The defaults (128 MB of float32: 672 tokens of a 49k vocabulary) size `logprobs.head_entropy`'s chunks.
    `fused_linear_pass` gives `TORCH_CHUNK_BYTES` (192 MB, what its bf16 forward chunk of 672 tokens held
    before: the bf16 logits and their float32 copy) and bytes_per_logit 4 for a float32 chunk (976 tokens),
    6 for a bf16 forward (the chunk and its float32 log-softmax: 651 tokens), 2 for a bf16 backward (only
    the chunk, its softmax written over it: 1953 tokens; fewer chunks, so fewer float32 additions into dW).
    Smaller chunks are not cheaper on a CPU: each chunk's bf16 matmul re-lays out the whole [V, H]
    weight for the matrix units (AMX), so with bf16 autocast 64-token chunks took 2.8x the time of
    512-token ones (135M SmolLM2, V = 49152, 2048 tokens, one thread; fp32 is flat from 256 up).
    Against the unchunked ~3 x N x V x 4 bytes (logits, their log-softmax, their gradient: 2.4 GB
    for 4096 tokens of that vocabulary) this holds one chunk.
    """
    rows = max(16, budget_bytes // (bytes_per_logit * vocab_size) // 16 * 16)
    return max(1, min(n_tokens, rows))


def _block_v(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 16 KB of fp32 a step on a GPU; tiny blocks in the interpreter so that
    small test vocabularies still take several steps."""
    if _interpreting():
        return min(32, triton.next_power_of_2(vocab_size)), 1
    return min(4096, triton.next_power_of_2(vocab_size)), 8


def fused_linear_pass(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, inv_temperature: float,
    ignore_index: int, lse: torch.Tensor, logprob: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None, grad_hidden: torch.Tensor | None = None,
    grad_weight: torch.Tensor | None = None, chunk: int | None = None, backend: str = "triton",
) -> None:
    """Walk token chunks of hidden: [N, H] against weight: [V, H] and run the row kernel on each
    (backend "triton": `_ce_rows_kernel`; "torch": `_ce_chunk_torch`).

    logprob given: compute lse [N] and logprob [N] (fp32) in the same pass; otherwise lse is read.
    row_scale [N] given: also write grad_hidden [N, H] (overwritten) and/or add into grad_weight [V, H]
    (in grad_weight's dtype: float32 accumulates low-precision chunks exactly up to one rounding each).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    on_triton = backend == "triton"
    # the torch path takes a low-precision chunk's log-softmax in a float32 scratch chunk
    float32_scratch = not on_triton and logprob is not None and hidden.dtype in (torch.float16, torch.bfloat16)
    C = chunk or (chunk_size(N, H, V) if on_triton else
                  cpu_chunk_size(N, V, hidden.element_size() + 4 * float32_scratch, TORCH_CHUNK_BYTES))
    write_grad = row_scale is not None
    buf = torch.empty(min(C, N), V, dtype=hidden.dtype, device=hidden.device)
    wide_buf = torch.empty(min(C, N), V, dtype=torch.float32, device=hidden.device) if float32_scratch else None
    for s in range(0, N, C):
        e = min(s + C, N)
        if not on_triton:
            _ce_chunk_torch(hidden[s:e], weight, labels[s:e], buf[: e - s],
                            None if wide_buf is None else wide_buf[: e - s], inv_temperature=inv_temperature,
                            ignore_index=ignore_index, lse=lse[s:e],
                            logprob=logprob[s:e] if logprob is not None else None,
                            row_scale=row_scale[s:e] if write_grad else None,
                            grad_hidden=grad_hidden[s:e] if grad_hidden is not None and write_grad else None,
                            grad_weight=grad_weight if write_grad else None)
            continue
        logits = torch.mm(hidden[s:e], weight.T, out=buf[: e - s])  # (C, V)
        block_v, num_warps = _block_v(V)
        _ce_rows_kernel[(e - s,)](
            logits, logits.stride(0), labels[s:e], row_scale[s:e] if write_grad else lse[s:e], lse[s:e],
            logprob[s:e] if logprob is not None else lse[s:e], V, inv_temperature, ignore_index,
            BLOCK_V=block_v, COMPUTE_LSE=logprob is not None, WRITE_GRAD=write_grad, num_warps=num_warps,
        )
        if not write_grad:
            continue
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[s:e])
        if grad_weight is not None:
            _add_grad_weight(grad_weight, logits, hidden[s:e])


def _grad_weight_buffer(weight: torch.Tensor) -> torch.Tensor:
    """Zeros for dW, float32 when the weight is bf16/fp16: the sum over chunks then rounds once, at the
    end, as one unchunked matmul would, instead of once a chunk to 8 bits of mantissa."""
    wide = weight.dtype in (torch.float16, torch.bfloat16)
    return torch.zeros(weight.shape, dtype=torch.float32 if wide else weight.dtype, device=weight.device)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean or sum cross-entropy; dh and dW are computed in the forward and scaled in the backward.

    want_grad: whether a backward will follow (grad mode on and an input requiring grad, decided by the
    caller: inside forward grad mode is always off and needs_input_grad ignores torch.no_grad()), so that
    an evaluation pass costs one matmul instead of three.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk, backend="triton", want_grad=True):
        ctx.weight_dtype = weight.dtype
        weight = weight.to(hidden.dtype)  # autocast: cast here, so dW comes back in the weight's own dtype
        N = hidden.shape[0]
        valid = labels != ignore_index
        count = valid.sum().float()
        row_scale = valid.float() / count if reduction == "mean" else valid.float()
        lse = torch.empty(N, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        logprob = torch.empty_like(lse)
        grad_hidden = hidden.new_empty(hidden.shape) if want_grad and ctx.needs_input_grad[0] else None
        grad_weight = _grad_weight_buffer(weight) if want_grad and ctx.needs_input_grad[1] else None
        wants_grad = grad_hidden is not None or grad_weight is not None
        fused_linear_pass(hidden, weight, labels, inv_temperature=1.0, ignore_index=ignore_index, lse=lse,
                          logprob=logprob, row_scale=row_scale if wants_grad else None,
                          grad_hidden=grad_hidden, grad_weight=grad_weight, chunk=chunk, backend=backend)
        ctx.save_for_backward(grad_hidden, grad_weight)
        loss = -logprob.sum()
        return loss / count if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = (grad_hidden * grad_loss).to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None, None


class FusedLinearLogprobs(torch.autograd.Function):
    """Per-token label log-probs; the backward recomputes each chunk's logits from the saved lse."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, chunk, backend="triton"):
        ctx.weight_dtype = weight.dtype
        weight = weight.to(hidden.dtype)  # autocast: cast here, so dW comes back in the weight's own dtype
        N = hidden.shape[0]
        lse = torch.empty(N, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        logprob = torch.empty_like(lse)
        fused_linear_pass(hidden, weight, labels, inv_temperature=1.0 / temperature, ignore_index=ignore_index,
                          lse=lse, logprob=logprob, chunk=chunk, backend=backend)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.ignore_index, ctx.chunk, ctx.backend = temperature, ignore_index, chunk, backend
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob):
        hidden, weight, labels, lse = ctx.saved_tensors
        valid = labels != ctx.ignore_index
        # d logp / dz = -(p - onehot)
        row_scale = torch.where(valid, -grad_logprob.to(lse.dtype), torch.zeros_like(lse))
        grad_hidden = hidden.new_empty(hidden.shape) if ctx.needs_input_grad[0] else None  # contiguous
        grad_weight = _grad_weight_buffer(weight) if ctx.needs_input_grad[1] else None
        if grad_hidden is not None or grad_weight is not None:
            fused_linear_pass(hidden, weight, labels, inv_temperature=1.0 / ctx.temperature,
                              ignore_index=ctx.ignore_index, lse=lse, row_scale=row_scale,
                              grad_hidden=grad_hidden, grad_weight=grad_weight, chunk=ctx.chunk, backend=ctx.backend)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        compute_dtype: torch.dtype | None = None) -> None:
    """Raise ValueError naming the argument when shapes or dtypes do not fit [N, H], [V, H], [N].
    compute_dtype (autocast's): the weight may be stored in another floating dtype, cast to it inside."""
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"kernels.cross_entropy: want hidden [N, H], weight [V, H], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"kernels.cross_entropy: shapes do not match: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype and not (compute_dtype == hidden.dtype and weight.is_floating_point()):
        raise ValueError(f"kernels.cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} dtypes differ")
    if labels.is_floating_point():
        raise ValueError(f"kernels.cross_entropy: labels must be integers, got {labels.dtype}")


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fused_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk, backend) -> torch.Tensor:
    if reduction == "none":
        return -FusedLinearLogprobs.apply(hidden, weight, labels, 1.0, ignore_index, chunk, backend)
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk, backend,
                                         _wants_grad(hidden, weight))


# The backends of minirlhf.kernels' dispatch, which checks the inputs first (shapes, dtypes, labels in [0, V)
# or ignore_index: an out-of-range label would read outside its row of logits).


def linear_cross_entropy_triton(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", chunk: int | None = None,
) -> torch.Tensor:
    """Fused version of linear_cross_entropy_torch. reduction "none" gives [N] fp32 (0 where ignored).
    chunk overrides chunk_size() (tests use it to cross chunk edges with tiny N)."""
    return _fused_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk, "triton")


def linear_logprobs_triton(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    ignore_index: int = -100, chunk: int | None = None,
) -> torch.Tensor:
    """Fused version of linear_logprobs_torch: [N] fp32 label log-probs, 0 where ignored."""
    return FusedLinearLogprobs.apply(hidden, weight, labels, float(temperature), ignore_index, chunk, "triton")


def linear_cross_entropy_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    reduction: str = "mean", chunk: int | None = None,
) -> torch.Tensor:
    """linear_cross_entropy_torch without the [N, V] logits: the fused chunk loop with torch ops for the
    rows, chunks of `cpu_chunk_size` tokens (any device, no Triton); chunk overrides the size."""
    return _fused_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk, "torch")


def linear_logprobs_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    ignore_index: int = -100, chunk: int | None = None,
) -> torch.Tensor:
    """linear_logprobs_torch without the [N, V] logits (see linear_cross_entropy_chunked)."""
    return FusedLinearLogprobs.apply(hidden, weight, labels, float(temperature), ignore_index, chunk, "torch")
