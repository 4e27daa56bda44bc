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
    """
    if beta <= 0:
        raise ValueError(f"losses.dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"losses.dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
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
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -ln 2, log1p(-exp(x)) below."""
    switch = x > -math.log(2.0)
    # Each branch is evaluated on a value that is safe for it, so neither produces inf/NaN gradients.
    near_zero = torch.where(switch, x, torch.full_like(x, -1.0))
    far = torch.where(switch, torch.full_like(x, -1.0), x)
    return torch.where(switch, torch.log(-torch.expm1(near_zero)), torch.log1p(-torch.exp(far)))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, chosen_nll: Tensor, beta: float = 0.1) -> Tensor:
    """ORPO: SFT loss plus an odds-ratio preference term.

    log odds(p) = p - log(1 - e^p)    for p = average log-prob of a response
    L = nll(y_w) - beta * log sigmoid(log odds(p_w) - log odds(p_l))   (Hong et al. 2024, section 3, eqs. 6-7)
    chosen_avg_logps, rejected_avg_logps, chosen_nll: [B]. Returns [B]. The average log-probs are clamped
    to at most -eps (eps = the dtype's machine epsilon) so that log odds stays finite as p -> 0.
    """
    eps = torch.finfo(chosen_avg_logps.dtype).eps

    def log_odds(p: Tensor) -> Tensor:
        p = p.clamp(max=-eps)
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


# ===================================================================================================
# GRPO family: critic-free RL on verifiable rewards (grpo stage)
#
# Layout: N = num_groups * G completions, prompt-major (the G samples of a prompt are adjacent rows);
# F reward functions; T completion positions. Rewards are NaN where a reward function returned None.
# Defaults follow TRL 1.16's GRPOConfig (eps 1e-4 in the advantage denominators, loss_type "dapo",
# epsilon 0.2, token-level ratios, beta 0); docs/grpo.md lists every knob and paper.
# ===================================================================================================

SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _check_choice(value: str, choices: tuple[str, ...], name: str, caller: str) -> None:
    if value not in choices:
        raise ValueError(f"losses.{caller}: {name} must be one of {', '.join(choices)}, got {value!r}")


def _grouped(rewards: Tensor, group_size: int, caller: str) -> Tensor:
    """rewards [N] or [N, F] -> [N // group_size, group_size(, F)], detached."""
    if rewards.dim() not in (1, 2):
        raise ValueError(f"losses.{caller}: rewards must be [N] or [N, F], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"losses.{caller}: {rewards.shape[0]} rewards are not a whole number of groups of {group_size}"
        )
    return rewards.detach().view(-1, group_size, *rewards.shape[1:])


def nan_std(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased (Bessel-corrected) standard deviation of the non-NaN entries of x, over `dim` (all when
    None). NaN where fewer than 2 entries are non-NaN, the same convention as TRL's `nanstd`."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    sq = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    std = var.sqrt()
    if not keepdim:
        std = std.squeeze() if dim is None else std.squeeze(dim)
    return std


def weighted_reward_sum(rewards_per_func: Tensor, weights: Tensor | list[float] | None = None) -> Tensor:
    """One reward per completion: r_i = sum_f w_f * r_if over the functions that scored it (nansum),
    NaN where every function returned None (an unscorable completion), as TRL's GRPOTrainer does.

    rewards_per_func: [N, F] (NaN = None); weights: [F] (None = all 1). Returns [N], detached.
    """
    r = rewards_per_func.detach()
    if r.dim() != 2:
        raise ValueError(f"losses.weighted_reward_sum: rewards must be [N, F], got shape {tuple(r.shape)}")
    w = torch.ones(r.shape[1], dtype=r.dtype, device=r.device) if weights is None \
        else torch.as_tensor(weights, dtype=r.dtype, device=r.device)
    if w.shape != (r.shape[1],):
        raise ValueError(f"losses.weighted_reward_sum: {r.shape[1]} reward functions but {w.numel()} weights")
    total = (r * w).nansum(dim=1)
    return total.masked_fill(torch.isnan(r).all(dim=1), float("nan"))


def group_relative_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's outcome advantage: each reward minus its group's mean, optionally divided by a std.

    A_i = (r_i - mean_g(r)) / (std + eps)                    (DeepSeekMath, Shao et al. 2024, sec. 4.1.2)
      scale_rewards="group": std of the group (the paper's GRPO; TRL's default)
      scale_rewards="batch": std of all N rewards (group mean, batch std: Lite PPO, Z. Liu et al. 2025,
                             "Tricks or Traps? A Deep Dive into RL for LLM Reasoning")
      scale_rewards="none":  no division (Dr. GRPO, Z. Liu et al. 2025, "Understanding R1-Zero-Like
                             Training", sec. 3.1: the std up-weights groups nearly all right or all wrong)
    NaN rewards (unscorable completions) are left out of the means and stds and get advantage 0; std is the
    unbiased sample std, as in TRL. rewards: [N] prompt-major, N = num_groups * group_size. Returns [N],
    detached; the same advantage applies to every token of the completion (never re-whitened per token).
    """
    _check_choice(scale_rewards, SCALE_REWARDS, "scale_rewards", "group_relative_advantages")
    g = _grouped(rewards, group_size, "group_relative_advantages")  # [groups, G]
    advantages = g - torch.nanmean(g, dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nan_std(g, dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (nan_std(g) + eps)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def leave_one_out_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "none", eps: float = 1e-4
) -> Tensor:
    """RLOO: each reward minus the mean of the other scorable samples of its prompt.

    A_i = r_i - 1/(k - 1) * sum_{j != i} r_j        (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics")
    k counts the group's scorable (non-NaN) rewards; an unscorable completion, or the only scorable one of
    its group, gets 0. scale_rewards="batch" then standardizes over the batch, (A - mean A) / (std A + eps),
    which is TRL RLOOTrainer's `normalize_advantages`; "none" (the default, the paper's) leaves A as it is.
    rewards: [N] prompt-major. Returns [N], detached.
    """
    if scale_rewards not in ("none", "batch"):
        raise ValueError(f"losses.leave_one_out_advantages: scale_rewards must be 'none' or 'batch', got "
                         f"{scale_rewards!r} (dividing a leave-one-out advantage by its group's std is GRPO's)")
    if group_size < 2:
        raise ValueError(f"losses.leave_one_out_advantages: group_size must be >= 2 to leave one out, got {group_size}")
    g = _grouped(rewards, group_size, "leave_one_out_advantages")  # [groups, G]
    count = (~torch.isnan(g)).sum(dim=1, keepdim=True).to(g.dtype)
    others_mean = (torch.nansum(g, dim=1, keepdim=True) - g) / (count - 1)  # NaN or inf when count <= 1
    advantages = torch.where(count > 1, g - others_mean, torch.full_like(g, float("nan"))).reshape(-1)
    if scale_rewards == "batch":
        advantages = (advantages - torch.nanmean(advantages)) / (nan_std(advantages) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def decoupled_group_advantages(
    rewards_per_func: Tensor, group_size: int, weights: Tensor | list[float] | None = None, eps: float = 1e-4
) -> Tensor:
    """Multi-reward advantages that normalize each reward function within its group before summing
    (GDPO, S.-Y. Liu et al. 2026, "Group reward-Decoupled Normalization Policy Optimization"; TRL's
    multi_objective_aggregation="normalize_then_sum"):

    z_if = (r_if - mean_g(r_f)) / (std_g(r_f) + eps)      per function f, within each group g
    s_i  = sum_f w_f z_if                                   (nansum; NaN when no function scored i)
    A_i  = (s_i - mean(s)) / (std(s) + eps)                 over the whole batch

    Summing first (GRPO) maps different reward combinations with equal totals, e.g. (1, 0) and (0, 1), to
    the same advantage; normalizing each function first keeps them apart and gives every function unit
    spread within its group before the weights apply. rewards_per_func: [N, F]
    (NaN = None); weights: [F]. Returns [N], detached; unscorable completions get 0.
    """
    g = _grouped(rewards_per_func, group_size, "decoupled_group_advantages")  # [groups, G, F]
    n_funcs = g.shape[-1]
    z = (g - torch.nanmean(g, dim=1, keepdim=True)) / (nan_std(g, dim=1, keepdim=True) + eps)
    # a function whose z is NaN for a row (the only score of its group) adds nothing to that row, as in TRL
    s = weighted_reward_sum(z.reshape(-1, n_funcs), weights).nan_to_num(nan=0.0)  # [N]
    s = s.masked_fill(torch.isnan(g.reshape(-1, n_funcs)).all(dim=1), float("nan"))
    advantages = (s - torch.nanmean(s)) / (nan_std(s) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_advantages(
    rewards_per_func: Tensor,
    group_size: int,
    weights: Tensor | list[float] | None = None,
    *,
    estimator: str = "grpo",
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Per-completion advantages of the grpo stage from the scores of its reward functions.

    aggregation="sum_then_normalize" (TRL's default): r = weighted_reward_sum(rewards_per_func, weights), then
      estimator="grpo": group_relative_advantages(r, group_size, scale_rewards)
      estimator="rloo": leave_one_out_advantages(r, group_size, scale_rewards in {"none", "batch"})
    aggregation="normalize_then_sum": decoupled_group_advantages (GDPO); defined for estimator "grpo" and
      scale_rewards "group" only (each function is divided by its group std), anything else is an error.
    rewards_per_func: [N, F] (NaN where a function returned None), prompt-major. Returns [N], detached.
    """
    caller = "grpo_advantages"
    _check_choice(estimator, ADVANTAGE_ESTIMATORS, "estimator", caller)
    _check_choice(aggregation, REWARD_AGGREGATIONS, "aggregation", caller)
    _check_choice(scale_rewards, SCALE_REWARDS, "scale_rewards", caller)
    if aggregation == "normalize_then_sum":
        if estimator != "grpo" or scale_rewards != "group":
            raise ValueError(f"losses.{caller}: normalize_then_sum divides each reward by its group std, so it needs "
                             f"estimator 'grpo' and scale_rewards 'group', got {estimator!r} and {scale_rewards!r}")
        return decoupled_group_advantages(rewards_per_func, group_size, weights, eps=eps)
    rewards = weighted_reward_sum(rewards_per_func, weights)
    if estimator == "rloo":
        return leave_one_out_advantages(rewards, group_size, scale_rewards=scale_rewards, eps=eps)
    return group_relative_advantages(rewards, group_size, scale_rewards=scale_rewards, eps=eps)


def informative_groups(grouped_rewards: Tensor, tol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: which groups carry a learning signal.

    A group whose G rewards are all equal has every group-relative advantage 0 and adds only noise (and
    KL) to the update; DAPO (Yu et al. 2025, sec. 3.2: 0 < |{o_i correct}| < G) drops such groups
    and samples more prompts until the batch is full. Here a group is kept when at least two of its rewards
    are non-NaN and max - min > tol over them. grouped_rewards: [num_groups, G] (the aggregated reward of
    each completion, NaN = unscorable). Returns [num_groups] bool.
    """
    if grouped_rewards.dim() != 2:
        raise ValueError(f"losses.informative_groups: rewards must be [num_groups, G], got "
                         f"shape {tuple(grouped_rewards.shape)}")
    r = grouped_rewards.detach()
    scored = ~torch.isnan(r)
    spread = torch.where(scored, r, -math.inf).amax(dim=1) - torch.where(scored, r, math.inf).amin(dim=1)
    return (scored.sum(dim=1) >= 2) & (spread > tol)


def mask_truncated_completions(
    completion_ids: Tensor, completion_mask: Tensor, stop_ids: int | list[int] | Tensor
) -> tuple[Tensor, Tensor]:
    """Drop completions that never emitted a stop token from the loss (DAPO, Yu et al. 2025, sec. 3.4,
    "overlong filtering"; TRL's mask_truncated_completions): a reply cut off by max_new_tokens would be
    punished for its length rather than its content.

    completion_ids: [B, T]; completion_mask: [B, T] (bool or 0/1, 1 on generated tokens, the stop token
    included); stop_ids: the end-of-turn/eos id(s). Returns (the mask with truncated rows zeroed, same
    dtype as completion_mask; truncated [B] bool).
    """
    stops = torch.as_tensor(stop_ids, device=completion_ids.device).reshape(-1)
    has_stop = (torch.isin(completion_ids, stops) & completion_mask.bool()).any(dim=-1)  # [B]
    truncated = ~has_stop
    return completion_mask * has_stop.unsqueeze(-1).to(completion_mask.dtype), truncated


def grpo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    num_items_in_batch: Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy-gradient loss of GRPO and its variants, for one micro-batch.

    Per token t of completion i, with r_it = pi(y_it) / pi_old(y_it) and A_i the completion's advantage:
      clipped (grpo, bnpo, dapo, dr_grpo):
        l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)   (PPO-clip, DeepSeekMath eq. 3;
               eps_high > eps_low is DAPO's clip-higher, Yu et al. 2025, sec. 3.1)
        delta (INTELLECT-2 two-sided clipping, 2025): r_it in the unclipped branch is capped at delta, so a
               negative advantage cannot push a token whose ratio has already run away.
      cispo (MiniMax-M1, 2025, sec. 3.1):
        l_it = -sg(min(r_it, 1 + eps_high)) A_i log pi(y_it)  the importance weight is clipped and
               detached, so every token keeps a gradient (no lower bound, as MiniMax-M1 runs it). TRL's
               cispo takes the cap itself as `epsilon_high`: TRL's 5.0 is 4.0 here.
      importance_sampling_level="sequence" (GSPO, Zheng et al. 2025, sec. 4.1; the "GSPO-token" form):
        r_it = sg(s_i) * pi(y_it) / sg(pi(y_it)),  s_i = exp(mean_t log(pi(y_it) / pi_old(y_it)))
               every token of i carries the sequence ratio s_i (so clipping acts on whole sequences) and the
               gradient s_i * grad log pi(y_it); this equals TRL's [B, 1] sequence ratio in value and
               gradient under every aggregation below, and also takes per-token advantages.
      beta > 0 adds beta * k3_it, k3 = e^d - d - 1, d = log ref - log pi (Schulman 2020; DeepSeekMath
               eq. 4), to every token, inside the token average as in DeepSeekMath eq. 3.
    Aggregation of l_it (mask m_it), `loss_type`:
      grpo:    mean_i [ sum_t m l / sum_t m ]           (per-sequence token mean; DeepSeekMath eq. 3)
      bnpo:    sum_it m l / sum_it m                    (token mean over this micro-batch)
      dapo:    sum_it m l / num_items_in_batch          (token mean over the whole accumulated batch, DAPO
               sec. 3.3: the caller passes that batch's token count, summed over ranks and divided by the
               number of ranks, as gradients are averaged over ranks, and sums, not averages, the
               micro-batch losses; None = this micro-batch's count, i.e. bnpo)
      dr_grpo: sum_it m l / (B * max_completion_length)  (Dr. GRPO: a constant in place of |o_i|)
      cispo:   as dapo.
    grpo, bnpo and dr_grpo are means over this micro-batch: divide by the accumulation steps as usual.

    logprobs: [B, T] (with grad); old_logprobs, ref_logprobs: [B, T] (constants; pass logprobs.detach() as
    old_logprobs for an on-policy step); advantages: [B] or [B, T] (constants); mask: [B, T] bool or 0/1.
    Log-ratios are clamped to +-20 before exp. Returns (loss scalar, diagnostics: detached scalars
    clip_low / clip_high / clip_region (fractions of tokens, or of sequences at sequence level, whose
    clipped branch is active: ratio < 1 - eps_low with A < 0, ratio > 1 + eps_high with A > 0; for cispo
    clip_high is the fraction whose weight was capped), ratio_mean, and kl (mean k3) when ref_logprobs is
    given).
    """
    caller = "grpo_policy_loss"
    _check_choice(loss_type, GRPO_LOSS_TYPES, "loss_type", caller)
    _check_choice(importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level", caller)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ValueError(f"losses.{caller}: need 0 <= epsilon_low < 1 and epsilon_high >= 0, "
                         f"got {epsilon_low} and {epsilon_high}")
    if delta is not None and (loss_type == "cispo" or delta <= 1.0):
        raise ValueError(f"losses.{caller}: delta caps the ratio of the clipped losses and must be > 1; "
                         f"got delta={delta} with loss_type {loss_type!r}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"losses.{caller}: beta={beta} needs ref_logprobs")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"losses.{caller}: dr_grpo needs max_completion_length >= 1, got {max_completion_length}")

    m = _float_mask(mask, logprobs)
    adv = advantages.detach().to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    token_log_ratio = (logprobs - old_logprobs.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T]
    if importance_sampling_level == "token":
        log_ratio = token_log_ratio
    else:
        seq_log_ratio = masked_mean(token_log_ratio.detach(), mask, dim=-1)  # [B]
        log_ratio = seq_log_ratio.unsqueeze(-1) + (logprobs - logprobs.detach())  # value s_i, gradient of log pi
    ratio = torch.exp(log_ratio)  # [B, T]

    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=1.0 + epsilon_high).detach()
        per_token = -weight * adv * logprobs
        clip_low = torch.zeros_like(ratio, dtype=torch.bool)
        clip_high = ratio.detach() > 1.0 + epsilon_high
    else:
        clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.minimum(capped_ratio * adv, clipped_ratio * adv)
        clip_low = (ratio.detach() < 1.0 - epsilon_low) & (adv < 0)
        clip_high = (ratio.detach() > 1.0 + epsilon_high) & (adv > 0)
    per_token = per_token.expand_as(logprobs)

    kl = None
    if ref_logprobs is not None:
        kl = _k3(ref_logprobs.detach() - logprobs)  # [B, T]
        if beta != 0.0:
            per_token = per_token + beta * kl

    masked = torch.where(m != 0, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)) * m
    if loss_type == "grpo":
        loss = (masked.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo" or (num_items_in_batch is None and loss_type in ("dapo", "cispo")):
        loss = masked.sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (logprobs.shape[0] * max_completion_length)
    else:
        loss = masked.sum() / torch.as_tensor(num_items_in_batch, dtype=masked.dtype, device=masked.device).clamp(min=1)

    def share(flags: Tensor) -> Tensor:
        flags = flags.expand_as(logprobs).to(logprobs.dtype)
        if importance_sampling_level == "sequence":  # one value per (non-empty) sequence
            return masked_mean(flags[:, 0], m.sum(-1) > 0).detach()
        return masked_mean(flags, mask).detach()

    stats = {
        "clip_low": share(clip_low),
        "clip_high": share(clip_high),
        "clip_region": share(clip_low | clip_high),
        "ratio_mean": share(ratio.detach()),
    }
    if kl is not None:
        stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats
