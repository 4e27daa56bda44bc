"""Fused linear + cross-entropy / log-probs against float64 torch on the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minirlhf.kernels as K
from minirlhf.kernels.fused_cross_entropy import (
    chunk_size,
    fused_linear_pass,
    linear_cross_entropy_chunked,
    linear_cross_entropy_triton,
    linear_logprobs_chunked,
    linear_logprobs_torch,
    linear_logprobs_triton,
)
from tests.kernels.kernel_utils import DEVICE, nan_like, needs_triton, rel_err

# Relative error bounds (max abs error / max abs of the float64 result). The logits are rounded to the
# input dtype by the matmul (as unfused logits would be), the log-sum-exp is fp32, and the gradient of
# the logits is rounded once more before its two matmuls. Observed on these shapes: fp32 ~4e-7,
# fp16 ~7e-4, bf16 ~7e-3; the bounds leave ~3-5x headroom.
BOUNDS = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}
N, H, V, CHUNK = 37, 24, 123, 16  # 3 chunks (16, 16, 5) and, in the interpreter, 4 vocab blocks of 32
# the Triton kernel and the torch path (_ce_chunk_torch: fused softmax / log-softmax, the row scale on h and dh)
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
CROSS_ENTROPY = {"triton": linear_cross_entropy_triton, "torch": linear_cross_entropy_chunked}
LOGPROBS = {"triton": linear_logprobs_triton, "torch": linear_logprobs_chunked}


def make_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # ignored positions, in every chunk
    return hidden, weight, labels.to(DEVICE)


def float64_leaves(*tensors):
    return [x.detach().double().requires_grad_() for x in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_float64(backend, dtype, reduction):
    hidden, weight, labels = make_inputs(dtype)
    loss = CROSS_ENTROPY[backend](hidden, weight, labels, reduction=reduction, chunk=CHUNK)
    h64, w64 = float64_leaves(hidden, weight)
    ref = F.cross_entropy(h64 @ w64.T, labels, reduction=reduction)
    # upstream gradient: a scalar that is not 1 (mean / sum), a different value per token (none)
    upstream = torch.randn(N, dtype=torch.float64, device=DEVICE) if reduction == "none" else torch.tensor(
        1.7, dtype=torch.float64, device=DEVICE)
    (loss * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    bound = BOUNDS[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref.detach()) <= bound
    assert rel_err(hidden.grad, h64.grad) <= bound, f"dh {rel_err(hidden.grad, h64.grad):.1e}"
    assert rel_err(weight.grad, w64.grad) <= bound, f"dW {rel_err(weight.grad, w64.grad):.1e}"
    if reduction == "none":
        assert (loss[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_with_temperature_match_float64(backend, dtype):
    hidden, weight, labels = make_inputs(dtype, seed=1)
    logp = LOGPROBS[backend](hidden, weight, labels, temperature=0.7, chunk=CHUNK)
    h64, w64 = float64_leaves(hidden, weight)
    ref = torch.log_softmax((h64 @ w64.T) / 0.7, dim=-1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    ref = ref.masked_fill(labels == -100, 0.0)
    upstream = torch.randn(N, dtype=torch.float64, device=DEVICE)
    (logp * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    bound = BOUNDS[dtype]
    assert logp.dtype == torch.float32 and (logp[labels == -100] == 0).all()
    assert rel_err(logp, ref.detach()) <= bound
    assert rel_err(hidden.grad, h64.grad) <= bound
    assert rel_err(weight.grad, w64.grad) <= bound


@needs_triton
def test_frozen_head_and_no_grad():
    """A frozen LM head (LoRA runs) gets no gradient and costs no dW; under no_grad nothing is saved;
    the dispatch path with its own chunk size gives the same numbers."""
    hidden, weight, labels = make_inputs(torch.float32, seed=2)
    weight.requires_grad_(False)
    K.linear_logprobs(hidden, weight, labels, backend="triton").sum().backward()
    h64, w64 = float64_leaves(hidden, weight)
    linear_logprobs_torch(h64, w64, labels).sum().backward()
    assert weight.grad is None and rel_err(hidden.grad, h64.grad) <= BOUNDS[torch.float32]
    with torch.no_grad():
        loss = K.linear_cross_entropy(hidden, weight, labels, backend="triton")
    assert not loss.requires_grad
    assert rel_err(loss, F.cross_entropy(h64 @ w64.T, labels)) <= BOUNDS[torch.float32]


@needs_triton
def test_every_output_element_written():
    """fused_linear_pass with NaN-poisoned lse, logprob and grad_hidden buffers: all must be overwritten.
    grad_weight accumulates, so it starts at zero; row_scale = 1 on valid rows gives the gradient of
    the summed loss: dh = (softmax - onehot) W, dW = (softmax - onehot)^T h."""
    hidden, weight, labels = make_inputs(torch.float32, seed=3)
    hidden, weight = hidden.detach(), weight.detach()
    lse, logprob, grad_hidden = nan_like(labels.float()), nan_like(labels.float()), nan_like(hidden)
    grad_weight = torch.zeros_like(weight)
    row_scale = (labels != -100).float()
    fused_linear_pass(hidden, weight, labels, inv_temperature=1.0, ignore_index=-100, lse=lse, logprob=logprob,
                      row_scale=row_scale, grad_hidden=grad_hidden, grad_weight=grad_weight, chunk=CHUNK)
    logits = hidden.double() @ weight.double().T
    probs = torch.softmax(logits, -1)
    onehot = F.one_hot(labels.clamp_min(0), V).double()
    dlogits = (probs - onehot) * row_scale.double()[:, None]
    bound = BOUNDS[torch.float32]
    assert rel_err(lse, torch.logsumexp(logits, -1)) <= bound
    assert rel_err(grad_hidden, dlogits @ weight.double()) <= bound
    assert rel_err(grad_weight, dlogits.T @ hidden.double()) <= bound
    assert torch.isfinite(logprob).all() and (logprob[labels == -100] == 0).all()


@needs_triton
def test_all_ignored():
    """No valid token: sum is 0 with zero gradients; mean is 0/0 = NaN, as F.cross_entropy gives."""
    hidden, weight, _ = make_inputs(torch.float32, seed=4)
    labels = torch.full((N,), -100, device=DEVICE)
    loss = K.linear_cross_entropy(hidden, weight, labels, reduction="sum", backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()
    mean = K.linear_cross_entropy(hidden.detach(), weight.detach(), labels, backend="triton")
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(hidden.detach() @ weight.detach().T, labels))


@needs_triton
def test_out_of_range_label_raises():
    hidden, weight, labels = make_inputs(torch.float32)
    labels[3] = V
    with pytest.raises(ValueError, match=f"label {V} out of range"):
        K.linear_cross_entropy(hidden, weight, labels, backend="triton")


def test_torch_backend_matches_unfused():
    """backend="torch" (what CPU runs use: the chunked torch path) equals the plain unfused computation
    up to float32 rounding (tests/test_logprobs.py checks it in depth, gradients included)."""
    hidden, weight, labels = (x.cpu() if isinstance(x, torch.Tensor) else x for x in make_inputs(torch.float32))
    logits = (hidden @ weight.T).float()
    assert torch.allclose(K.linear_cross_entropy(hidden, weight, labels, backend="torch"),
                          F.cross_entropy(logits, labels), rtol=1e-6, atol=0)
    logp = K.linear_logprobs(hidden, weight, labels, temperature=2.0, backend="torch")
    want = torch.log_softmax(logits / 2.0, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0]
    assert torch.allclose(logp, want.masked_fill(labels == -100, 0.0), rtol=0, atol=1e-6)


def test_chunk_size_arithmetic():
    # C = max(1024, next_pow2(ceil(N*H/V))), capped at N
    assert chunk_size(16384, 4096, 131072) == 1024  # N*H/V = 512
    assert chunk_size(4096, 4096, 32000) == 1024  # ceil(524.3) = 525 -> 1024
    assert chunk_size(100_000, 4096, 32000) == 16384  # 12800 -> 16384
    assert chunk_size(10, 4096, 32000) == 10


def test_bad_arguments_raise():
    hidden, weight, labels = torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction must be one of"):
        K.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="shapes do not match"):
        K.linear_cross_entropy(hidden, torch.zeros(16, 9), labels)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        K.linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        K.linear_logprobs(hidden, weight, labels, backend="cuda")


@needs_triton
def test_training_curve_matches_torch_path():
    """A tiny embedding + LM head trained by SGD from one seed, once through the fused kernel and once
    through the torch reference: the loss curves and final weights agree (the kernel is a drop-in)."""
    torch.manual_seed(5)
    tokens = torch.randint(0, V, (N + 1,), device=DEVICE)
    inputs, labels = tokens[:-1], tokens[1:].clone()
    labels[::6] = -100
    start_embed, start_head = torch.randn(V, H, device=DEVICE), 0.3 * torch.randn(V, H, device=DEVICE)
    curves, finals = {}, {}
    for backend in ("triton", "torch"):
        embed = start_embed.clone().requires_grad_()
        head = start_head.clone().requires_grad_()
        curve = []
        for _ in range(4):
            loss = K.linear_cross_entropy(embed[inputs], head, labels, backend=backend)
            embed.grad = head.grad = None
            loss.backward()
            with torch.no_grad():
                embed -= 0.5 * embed.grad
                head -= 0.5 * head.grad
            curve.append(loss.item())
        curves[backend], finals[backend] = curve, (embed.detach(), head.detach())
    assert curves["triton"][-1] < curves["triton"][0]  # it trains
    assert max(abs(a - b) for a, b in zip(curves["triton"], curves["torch"])) < 1e-5
    for got, want in zip(finals["triton"], finals["torch"]):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_weight_under_bf16_autocast(reduction):
    """A float32 head under CPU bf16 autocast (the torch path): the weight is cast inside the autograd
    Function, so its gradient comes back float32 (the float32 sum over chunks), and it matches float64 on the
    bf16-rounded inputs within the bf16 bound; the loss function, not the caller, does the cast."""
    hidden, weight, labels = (x.cpu() for x in make_inputs(torch.float32, seed=6))
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = K.linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="torch")
    (loss * upstream.float()).sum().backward()
    h64, w64 = float64_leaves(hidden.bfloat16(), weight.bfloat16())
    ref = F.cross_entropy(h64 @ w64.T, labels, reduction=reduction)
    (ref * upstream).sum().backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert rel_err(loss, ref.detach()) <= BOUNDS[torch.bfloat16]
    assert rel_err(weight.grad, w64.grad) <= BOUNDS[torch.bfloat16]
    assert rel_err(hidden.grad, h64.grad) <= BOUNDS[torch.bfloat16]
