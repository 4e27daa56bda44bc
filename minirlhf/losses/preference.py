"""Losses on preferences: the reward model's pairwise loss, and the DPO family (DPO and its pairwise
relatives, SimPO, ORPO) and KTO on a policy's and a reference's sequence log-probs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

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
