"""The GRPO family: critic-free RL on verifiable rewards (group-relative and leave-one-out advantages,
reward aggregation, DAPO's filters, and the clipped policy losses of GRPO and its variants).

Layout: N = num_groups * G completions, prompt-major (the G samples of a prompt are adjacent rows);
F reward functions; T completion positions. Rewards are NaN where a reward function returned None.
Defaults follow TRL 1.16's GRPOConfig (eps 1e-4 in the advantage denominators, loss_type "dapo",
epsilon 0.2, token-level ratios, beta 0); docs/grpo.md lists every knob and paper. ppo's critic-free
estimators use `group_relative_advantages` and `leave_one_out_advantages` too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minirlhf.losses.common import MAX_LOG_RATIO, float_mask, k3, masked_mean

SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo")
# the loss types whose value is a mean over the micro-batch, to divide by the accumulation steps; dapo and cispo
# divide by num_items_in_batch (the whole accumulated batch's tokens) themselves, so their losses are summed
MICRO_BATCH_MEAN_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
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
    grpo, bnpo and dr_grpo (MICRO_BATCH_MEAN_LOSS_TYPES) are means over this micro-batch: divide by the
    accumulation steps as usual.

    logprobs: [B, T] (with grad); old_logprobs, ref_logprobs: [B, T] (constants; pass logprobs.detach() as
    old_logprobs for an on-policy step); advantages: [B] or [B, T] (constants); mask: [B, T] bool or 0/1.
    Log-ratios are clamped to +-20 before exp. Returns (loss scalar, diagnostics: detached scalars
    clip_low / clip_high / clip_region (fractions of tokens, or of sequences at sequence level, whose
    clipped branch is active: ratio < 1 - eps_low with A < 0, ratio > 1 + eps_high with A > 0; for cispo
    clip_high is the fraction whose weight was capped), ratio_mean, and kl (mean k3) when ref_logprobs is
    given).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    _check_policy_loss_args(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                            ref_logprobs is not None, max_completion_length)
    m = float_mask(mask, logprobs)
    adv = advantages.detach().to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    token_log_ratio = (logprobs - old_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
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
        kl = k3(ref_logprobs.detach() - logprobs)  # [B, T]
        if beta != 0.0:
            per_token = per_token + beta * kl

    loss = _aggregate(per_token, m, loss_type, num_items_in_batch, max_completion_length)

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


def _check_policy_loss_args(loss_type: str, importance_sampling_level: str, epsilon_low: float, epsilon_high: float,
                            delta: float | None, beta: float, has_ref: bool, max_completion_length: int | None) -> None:
    """The argument checks of grpo_policy_loss: a ValueError naming the first that does not hold."""
    caller = "grpo_policy_loss"
    _check_choice(loss_type, GRPO_LOSS_TYPES, "loss_type", caller)
    _check_choice(importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level", caller)
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ValueError(f"losses.{caller}: need 0 <= epsilon_low < 1 and epsilon_high >= 0, "
                         f"got {epsilon_low} and {epsilon_high}")
    if delta is not None and (loss_type == "cispo" or delta <= 1.0):
        raise ValueError(f"losses.{caller}: delta caps the ratio of the clipped losses and must be > 1; "
                         f"got delta={delta} with loss_type {loss_type!r}")
    if beta != 0.0 and not has_ref:
        raise ValueError(f"losses.{caller}: beta={beta} needs ref_logprobs")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(f"losses.{caller}: dr_grpo needs max_completion_length >= 1, got {max_completion_length}")


def _aggregate(per_token: Tensor, m: Tensor, loss_type: str, num_items_in_batch: Tensor | float | None,
               max_completion_length: int | None) -> Tensor:
    """grpo_policy_loss's aggregation of the per-token terms l [B, T] under the float mask m [B, T] (the table
    in its docstring); masked positions never leak in, even when they hold inf or NaN."""
    masked = torch.where(m != 0, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)) * m
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo" or (num_items_in_batch is None and loss_type in ("dapo", "cispo")):
        return masked.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * max_completion_length)
    return masked.sum() / torch.as_tensor(num_items_in_batch, dtype=masked.dtype, device=masked.device).clamp(min=1)
