"""Every loss and advantage estimator of the pipeline, as pure functions of tensors.

Nothing here knows about models, batches or configs: a stage computes log-probs / values / scores
with its model and hands the tensors to one of these functions. Conventions shared by all of them:

- Masks may be bool or 0/1 floats; 1 (True) marks a position that counts.
- Hyperparameters are keyword arguments (`beta`, `gamma`, `clip_eps`, ...).
- The output dtype follows the inputs: float32 in, float32 out; float64 in, float64 out. Half-precision
  logits are promoted to float32 before any softmax.
- Diagnostics (clipfrac, implicit rewards) and advantages come back detached.
- Log-sigmoids and log(1 - e^p) go through `F.logsigmoid`, `F.softplus` and `log1mexp`, so the results
  stay finite for log-probs from -1e3 up to 0 and for rewards of +-100.

See docs/losses.md for the list of losses, their papers and the stage that uses each one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# exp() of a log-ratio above this would overflow float32 (e^88.7); 20 keeps ratios and k3 estimates
# finite (e^20 ~ 4.9e8) and is far beyond any ratio PPO's clipping lets through.
_MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------------
# masked reductions


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A bool or 0/1 mask as a float tensor of `like`'s dtype."""
    return mask.to(like.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is nonzero.

    x, mask: same shape. dim=None reduces everything to a scalar, otherwise the given dim(s).
    A slice whose mask is all zero gives 0 (not NaN), and values at masked positions never leak in,
    even when they are inf or NaN.
    """
    m = _float_mask(mask, x)
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
        n = _float_mask(mask, x).sum()
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


def _promote(logits: Tensor) -> Tensor:
    """float16/bfloat16 logits -> float32; float32 and float64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label: log softmax(logits / temperature)[label].

    logits: [B, T, V]; labels: [B, T] (already aligned: labels[b, t] is the token logits[b, t] predicts).
    Returns [B, T] with 0 where labels == ignore_index. Computed as gathered logit - logsumexp, so the
    full [B, T, V] log-softmax is never materialized.
    """
    if temperature <= 0:
        raise ValueError(f"losses.token_logps: temperature must be > 0, got {temperature}")
    logits = _promote(logits)
    if temperature != 1.0:
        logits = logits / temperature
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logps = picked - torch.logsumexp(logits, dim=-1)  # [B, T]
    return logps.masked_fill(ignored, 0.0)


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, mean over the tokens whose label is not `ignore_index`.

    L = -(1/N) * sum_{t: label_t != ignore} log softmax(logits_t)[label_t]
    logits: [B, T, V]; labels: [B, T], already shifted by the caller. Returns a scalar (0 when every
    label is ignored, rather than NaN).
    """
    logits = _promote(logits)
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
    m = _float_mask(mask, logps)
    total = (logps * m).sum(-1)  # [B]
    if not average:
        return total
    return total / m.sum(-1).clamp(min=1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim: H = logsumexp(z) - sum_i softmax(z)_i * z_i.

    logits: [..., V] -> [...]. The logits are shifted by their max first (H is shift-invariant), so large
    logits lose no precision; -inf logits (banned tokens) contribute 0.
    """
    logits = _promote(logits)
    z = logits - logits.amax(dim=-1, keepdim=True).detach()
    p = torch.softmax(z, dim=-1)
    z_finite = z.masked_fill(torch.isneginf(z), 0.0)
    return torch.logsumexp(z, dim=-1) - (p * z_finite).sum(-1)


# ---------------------------------------------------------------------------------------------------
# reward model


def reward_pair_loss(
    chosen: Tensor, rejected: Tensor, kind: str = "log_sig", margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise (Bradley-Terry) reward-model loss, mean over the batch.

    L = -log sigmoid(r_chosen - r_rejected - margin)            kind="log_sig"  (InstructGPT, Ouyang et al.
                                                                                  2022, eq. 1)
      = log(1 + exp(r_rejected - r_chosen + margin))            kind="log_exp"  (Anthropic's preference
                                                                                  model, Askell et al. 2021)
    The two are the same function; "log_sig" goes through logsigmoid and "log_exp" through softplus, both
    exact for rewards of +-100. margin: None, a float or [B] (Llama 2, Touvron et al. 2023, eq. 2).
    chosen, rejected: [B] rewards. Returns a scalar.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    if kind == "log_sig":
        losses = -F.logsigmoid(diff)
    elif kind == "log_exp":
        losses = F.softplus(-diff)
    else:
        raise ValueError(f"losses.reward_pair_loss: kind must be 'log_sig' or 'log_exp', got {kind!r}")
    return losses.mean()


# ---------------------------------------------------------------------------------------------------
# direct preference optimization family


def reward_centering_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """mean((r_c + r_r)^2): an auxiliary reward-model term that pulls each pair's mean reward towards 0,
    so scores stay centred (Eisenstein et al. 2023, "Helping or Herding?", sec. 3).

    chosen, rejected: [B] -> scalar.
    """
    return ((chosen + rejected) ** 2).mean()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its pairwise relatives, per example.

    All inputs: [B] sequence log-probs (summed over response tokens; average them for IPO to follow TRL).
    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
      sigmoid: -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)
               (DPO, Rafailov et al. 2023, eq. 7; ls > 0 is conservative DPO, Mitchell 2023)
      hinge:   max(0, 1 - beta * h)                 (SLiC-HF calibration loss, Zhao et al. 2023)
      ipo:     (h - 1 / (2 * beta))^2               (IPO, Azar et al. 2023, eq. 17, tau = beta)
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the implicit rewards
    beta * (log pi - log ref) are detached.
    label_smoothing is defined for sigmoid only: neither SLiC-HF's hinge nor IPO has a label-noise term
    (TRL 1.16 uses label_smoothing in its robust, exo_pair and aot losses, never in hinge or ipo), so a
    nonzero value with those is refused rather than ignored.
    """
    if beta <= 0:
        raise ValueError(f"losses.dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"losses.dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"losses.dpo_loss: label_smoothing is defined for loss_type 'sigmoid' only, got "
                         f"{label_smoothing} with {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"losses.dpo_loss: loss_type must be 'sigmoid', 'hinge' or 'ipo', got {loss_type!r}")
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float = 2.0, gamma: float = 0.5) -> Tensor:
    """SimPO: reference-free, length-normalized, with a target reward margin gamma.

    L = -log sigmoid(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma)   (Meng et al. 2024, eq. 6)
    chosen_avg_logps, rejected_avg_logps: [B] log-probs averaged over response tokens. Returns [B].
    """
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) below.

    x = 0 exactly (log(0) = -inf) is read as the negative number closest to 0 that is not subnormal,
    -finfo.tiny: the result is log(tiny) (-87.3 in float32, -708.4 in float64), finite, with zero gradient
    there. Every x < 0 is computed as is, however close to 0.
    """
    x = torch.where(x == 0, torch.full_like(x, -torch.finfo(x.dtype).tiny), x)
    switch = x > -math.log(2.0)
    # Each branch is evaluated on a value that is safe for it, so neither produces inf/NaN gradients.
    near_zero = torch.where(switch, x, torch.full_like(x, -1.0))
    far = torch.where(switch, torch.full_like(x, -1.0), x)
    return torch.where(switch, torch.log(-torch.expm1(near_zero)), torch.log1p(-torch.exp(far)))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, chosen_nll: Tensor, beta: float = 0.1) -> Tensor:
    """ORPO: SFT loss plus an odds-ratio preference term.

    log odds(p) = p - log(1 - e^p)    for p = average log-prob of a response
    L = nll(y_w) - beta * log sigmoid(log odds(p_w) - log odds(p_l))   (Hong et al. 2024, section 3, eqs. 6-7)
    chosen_avg_logps, rejected_avg_logps, chosen_nll: [B]. Returns [B]. log(1 - e^p) goes through
    `log1mexp`, exact for every p < 0 (p = -1e-8 included) and finite at p = 0.
    """

    def log_odds(p: Tensor) -> Tensor:
        return p - log1mexp(p)

    ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    return chosen_nll - beta * F.logsigmoid(ratio)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO: Kahneman-Tversky value of each unpaired example relative to the reference point z0 = kl.

    r = log pi(y|x) - log ref(y|x); z0 = max(kl, 0), detached.
    desirable:   w_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))          (Ethayarajh et al. 2024, eq. 8)
    1 - sigmoid(x) is computed as sigmoid(-x), which keeps its precision for large x.
    policy_logps, ref_logps: [B] summed log-probs; desirable: [B] bool (or 0/1); kl: scalar estimate of
    KL(pi || ref) from mismatched pairs. Returns [B].
    """
    r = policy_logps - ref_logps
    z0 = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().clamp(min=0)
    good = desirable_weight * torch.sigmoid(-beta * (r - z0))
    bad = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    return torch.where(desirable.bool(), good, bad)


# ---------------------------------------------------------------------------------------------------
# PPO: rewards, advantages, clipped objectives


def _k3(d: Tensor) -> Tensor:
    """k3 = e^d - 1 - d, elementwise, with d clamped at 20 (see _MAX_LOG_RATIO).

    For |d| >= 0.1, expm1(d) - d is accurate to a few ulps of the result. Below, the subtraction would
    cancel (k3 ~ d^2/2 while d is kept), so the Taylor series sum_{k=2..11} d^k / k! is used; the first
    omitted term is below 5e-19 of the result there.
    """
    d = d.clamp(max=_MAX_LOG_RATIO)
    small = d.abs() < 0.1
    ds = torch.where(small, d, torch.zeros_like(d))
    series = torch.zeros_like(d)
    for k in range(11, 1, -1):  # Horner: d^2 (1/2! + d (1/3! + d (... + d/11!)))
        series = series * ds + 1.0 / math.factorial(k)
    return torch.where(small, series * ds * ds, torch.expm1(d) - d)


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tensor:
    """Per-token PPO rewards: a KL penalty on every response token plus the reward model's score at the end.

    R_t = -kl_coef * kl_t * m_t  +  score * [t is the row's last position with m_t = 1]
    (Ziegler et al. 2019, section 2; InstructGPT, Ouyang et al. 2022, eq. 2), with d = ref - logp and
      k1: kl_t = -d = logp - ref
      k3: kl_t = (e^d - 1) - d     (Schulman 2020, "Approximating KL divergence"; >= 0, unbiased)
    k3 keeps full precision for |d| << 1 (see `_k3`) and clamps d at 20, so a collapsed token gives a large,
    finite penalty.
    scores: [B]; logprobs, ref_logprobs: [B, T]; mask: [B, T]. Returns [B, T], 0 at masked positions;
    a row whose mask is all zero gets no score.
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -d
    elif estimator == "k3":
        kl = _k3(d)
    else:
        raise ValueError(f"losses.kl_penalized_rewards: estimator must be 'k1' or 'k3', got {estimator!r}")
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))  # [B, T]
    T = mask.shape[-1]
    positions = torch.arange(1, T + 1, device=mask.device)
    last = (keep * positions).amax(-1) - 1  # [B], -1 for an empty row
    at_last = positions.unsqueeze(0) - 1 == last.unsqueeze(-1)  # [B, T], all False for an empty row
    return rewards + at_last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(-1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), batched over rows.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   returns = A + V.
    Masked positions are treated as absent: each valid position links to the next valid one of its row,
    the value after a row's last valid position is 0, and masked positions get advantage and return 0.
    (Right padding, left padding and holes all work.) rewards, values, mask: [B, T].
    Returns (advantages [B, T], returns [B, T]), detached. One vectorized step per time index.
    """
    rewards, values = rewards.detach(), values.detach()
    keep = mask.bool()
    B, T = rewards.shape
    zero = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value, next_adv = zero, zero
    advantages = [zero] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        valid = keep[:, t]
        advantages[t] = torch.where(valid, adv, zero)
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    advantages_t = torch.stack(advantages, dim=1)  # [B, T]
    returns = torch.where(keep, advantages_t + values, torch.zeros((), dtype=values.dtype, device=values.device))
    return advantages_t, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, as a loss to minimize (Schulman et al. 2017, eq. 7).

    ratio_t = exp(logp_t - logp_old_t)
    L = masked_mean(max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)))
    clipfrac = masked_mean([clipped term > unclipped term]) (the clipped branch set the loss), detached.
    logprobs, old_logprobs, advantages, mask: [B, T]; old_logprobs and advantages are constants (detached).
    The log-ratio is clamped to +-20 before exp so padded or diverged tokens cannot produce inf.
    Returns (loss scalar, clipfrac scalar).
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()
    return loss, clipfrac


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(old || new) from tokens sampled by the old policy, masked mean over tokens.

    d = logp - logp_old;  kl = (e^d - 1) - d >= 0   (Schulman 2020, "Approximating KL divergence")
    logprobs, old_logprobs, mask: [B, T]. Returns a scalar; differentiable (detach it to log it).
    """
    return masked_mean(_k3(logprobs - old_logprobs), mask)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (PPO2 in OpenAI baselines; studied by Engstrom et al. 2020).

    V_clip = V_old + clip(V - V_old, -eps, eps)
    L = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))
    clipfrac = masked_mean([(V_clip - R)^2 > (V - R)^2]), detached. old_values and returns are constants.
    values, old_values, returns, mask: [B, T]. Returns (loss scalar, clipfrac scalar).
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).to(values.dtype), mask).detach()
    return loss, clipfrac


# ---------------------------------------------------------------------------------------------------
# critic-free advantages (several samples per prompt, rows grouped contiguously: prompt-major)


def _groups(scores: Tensor, group_size: int, caller: str) -> Tensor:
    """scores [B] -> [B // group_size, group_size]."""
    if scores.dim() != 1:
        raise ValueError(f"losses.{caller}: scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"losses.{caller}: batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}"
        )
    return scores.detach().view(-1, group_size)


def group_normalized_advantages(scores: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages: A_i = (r_i - mean(group)) / (std(group) + eps)
    (Shao et al. 2024, DeepSeekMath, section 4.1.2). std is the unbiased sample std, as in TRL; a group of
    one gets advantage 0. scores: [B] -> [B], detached."""
    g = _groups(scores, group_size, "group_normalized_advantages")
    centered = g - g.mean(dim=1, keepdim=True)
    std = ((centered**2).sum(dim=1, keepdim=True) / max(group_size - 1, 1)).sqrt()
    return (centered / (std + eps)).reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j over the k samples of a prompt
    (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"). scores: [B] -> [B], detached."""
    if group_size < 2:
        raise ValueError(f"losses.rloo_advantages: group_size must be >= 2 to leave one out, got {group_size}")
    g = _groups(scores, group_size, "rloo_advantages")
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(-1)
