"""What every loss shares: the ignored label, masked means and variances, token and sequence log-probs of
logits, the language-model loss, entropy, and the clamped log-ratio with its k3 KL estimate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# the label of a position that is not trained: data.py writes it, every loss and log-prob skips it
IGNORE_INDEX = -100

# exp() of a log-ratio above this would overflow float32 (e^88.7); 20 keeps ratios and k3 estimates
# finite (e^20 ~ 4.9e8) and is far beyond any ratio PPO's clipping lets through.
MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------------
# masked reductions


def float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A bool or 0/1 mask as a float tensor of `like`'s dtype."""
    return mask.to(like.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is nonzero.

    x, mask: same shape. dim=None reduces everything to a scalar, otherwise the given dim(s).
    A slice whose mask is all zero gives 0 (not NaN), and values at masked positions never leak in,
    even when they are inf or NaN.
    """
    m = float_mask(mask, x)
    masked_x = torch.where(m != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * m
    if dim is None:
        num, den = masked_x.sum(), m.sum()
    else:
        num, den = masked_x.sum(dim), m.sum(dim)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the positions where `mask` is nonzero (a scalar).

    var = sum(m * (x - mean)^2) / sum(m), times n / (n - 1) (Bessel) when `unbiased`, n = sum(m).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = float_mask(mask, x).sum()
        if n.item() < 2:
            raise ValueError(
                f"losses.masked_var: unbiased variance needs at least 2 unmasked values, mask sums to {n.item()}"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalize `x` to unit variance over the mask: (x - mean) / sqrt(var + 1e-8).

    With shift_mean=False the mean is added back (only the scale changes), as done for PPO rewards.
    Masked positions come back as 0. x, mask: same shape, any rank.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------------
# token log-probabilities and language-model loss


def promote(logits: Tensor) -> Tensor:
    """float16/bfloat16 logits -> float32; float32 and float64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label: log softmax(logits / temperature)[label].

    logits: [B, T, V]; labels: [B, T] (already aligned: labels[b, t] is the token logits[b, t] predicts).
    Returns [B, T] with 0 where labels == ignore_index. Computed as gathered logit - logsumexp, so the
    full [B, T, V] log-softmax is never materialized.
    """
    if temperature <= 0:
        raise ValueError(f"losses.token_logps: temperature must be > 0, got {temperature}")
    logits = promote(logits)
    if temperature != 1.0:
        logits = logits / temperature
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logps = picked - torch.logsumexp(logits, dim=-1)  # [B, T]
    return logps.masked_fill(ignored, 0.0)


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token cross-entropy, mean over the tokens whose label is not `ignore_index`.

    L = -(1/N) * sum_{t: label_t != ignore} log softmax(logits_t)[label_t]
    logits: [B, T, V]; labels: [B, T], already shifted by the caller. Returns a scalar (0 when every
    label is ignored, rather than NaN).
    """
    logits = promote(logits)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Log-probability of each sequence: sum (or mean, when `average`) of label log-probs over `mask`.

    log pi(y|x) = sum_t m_t * log softmax(logits_t)[y_t]     (average: divided by sum_t m_t)
    logits: [B, T, V]; labels: [B, T] (aligned with logits; any value where mask is 0);
    mask: [B, T] bool or 0/1. Returns [B]. The average is the length-normalized log-prob of SimPO / ORPO
    (and IPO in TRL's convention).
    """
    keep = mask.bool()
    logps = token_logps(logits, labels.masked_fill(~keep, 0))  # [B, T]
    m = float_mask(mask, logps)
    total = (logps * m).sum(-1)  # [B]
    if not average:
        return total
    return total / m.sum(-1).clamp(min=1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim: H = logsumexp(z) - sum_i softmax(z)_i * z_i.

    logits: [..., V] -> [...]. The logits are shifted by their max first (H is shift-invariant), so large
    logits lose no precision; -inf logits (banned tokens) contribute 0.
    """
    logits = promote(logits)
    z = logits - logits.amax(dim=-1, keepdim=True).detach()
    p = torch.softmax(z, dim=-1)
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)



# ---------------------------------------------------------------------------------------------------
# KL estimate


def k3(d: Tensor) -> Tensor:
    """k3 = e^d - 1 - d, elementwise, with d clamped at 20 (see MAX_LOG_RATIO).

    For |d| >= 0.1, expm1(d) - d is accurate to a few ulps of the result. Below, the subtraction would
    cancel (k3 ~ d^2/2 while d is kept), so the Taylor series sum_{k=2..11} d^k / k! is used; the first
    omitted term is below 5e-19 of the result there.
    """
    d = d.clamp(max=MAX_LOG_RATIO)
    small = d.abs() < 0.1
    ds = torch.where(small, d, torch.zeros_like(d))
    series = torch.zeros_like(d)
    for k in range(11, 1, -1):  # Horner: d^2 (1/2! + d (1/3! + d (... + d/11!)))
        series = series * ds + 1.0 / math.factorial(k)
    return torch.where(small, series * ds * ds, torch.expm1(d) - d)
