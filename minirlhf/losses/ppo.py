"""PPO for RLHF: the KL-penalised per-token rewards, advantages (GAE, or the critic-free GRPO and RLOO),
the clipped policy and value losses, and the critic's explained variance."""

from __future__ import annotations

import torch
from torch import Tensor

from minirlhf.losses.common import MAX_LOG_RATIO, k3, masked_mean, masked_var
from minirlhf.losses.grpo import group_relative_advantages, leave_one_out_advantages

PPO_ESTIMATORS = ("gae", "grpo", "rloo")  # [ppo] estimator

# ---------------------------------------------------------------------------------------------------
# PPO: rewards, advantages, clipped objectives


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
        kl = k3(d)
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
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
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
    return masked_mean(k3(logprobs - old_logprobs), mask)


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


def ppo_advantages(
    estimator: str,
    rewards: Tensor,
    mask: Tensor,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    grpo_eps: float = 1e-6,
) -> tuple[Tensor, Tensor | None]:
    """Per-token advantages [B, N] (and returns [B, N] for the critic, else None) from rewards [B, N].

    gae:  generalized advantage estimation over the critic's values (Schulman et al. 2016, eq. 16).
    grpo: the sequence reward R = sum_t r_t (score minus the KL penalties) normalised within each group of
          `group_size` samples of one prompt (Shao et al. 2024, section 4.1.2), given to every token.
    rloo: R minus the mean R of the other samples of its prompt (Ahmadian et al. 2024), every token.
    grpo_eps: the eps of grpo's (r - mean) / (std + eps), 1e-6 for ppo (the grpo stage takes TRL's 1e-4); a
    group whose samples score alike gets 0 either way.
    The critic-free advantages are sequence-level quantities and stay as their papers define them: the
    stage never whitens them again over tokens (that would give a group whose samples scored alike a
    non-zero advantage whose sign depends on the lengths of other groups' answers).
    """
    if estimator == "gae":
        if values is None:
            raise ValueError("losses.ppo_advantages: estimator 'gae' needs the critic's values")
        return gae(rewards, values, mask, gamma=gamma, lam=lam)
    sequence_reward = (rewards * mask).sum(-1)  # (B,)
    if estimator == "grpo":
        per_sequence = group_relative_advantages(sequence_reward, group_size, eps=grpo_eps)
    elif estimator == "rloo":
        per_sequence = leave_one_out_advantages(sequence_reward, group_size)
    else:
        raise ValueError(f"losses.ppo_advantages: estimator must be one of {', '.join(PPO_ESTIMATORS)}, got "
                         f"{estimator!r}")
    return per_sequence[:, None] * mask.to(rewards.dtype), None


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the answer tokens: 1 = perfect critic, 0 = no better
    than a constant, negative = worse."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns
