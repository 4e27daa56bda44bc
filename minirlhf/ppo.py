"""The ppo stage: RLHF with a reward model and PPO (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT).

One trainer step is one rollout and its PPO epochs:

    prompts_per_rollout prompts --generate samples_per_prompt answers each--> rollout of B sequences
    score (reward model) + per-token KL penalty to the reference  -> rewards        (losses.kl_penalized_rewards)
    GAE over the critic's values                                    -> advantages   (losses.gae)
    ppo_epochs x (shuffle; minibatch_size sequences per optimizer update;
                  micro_batch_size sequences per forward/backward)   clipped policy + value losses

Four models, kept small in memory: the policy and the reference share one base when LoRA is on (the
reference is the policy with its adapter disabled; a frozen copy when training fully), the critic starts
from the reward model with its own adapter (or its own weights), and the reward model is frozen (loaded in
[ppo] reward_dtype, e.g. bfloat16). Generation and every rollout forward run without gradients.

The batch hierarchy, checked by config.py:
    rollout   = prompts_per_rollout * samples_per_prompt sequences    (one trainer step)
    minibatch = minibatch_size sequences, a divisor of the rollout    (one optimizer update)
    micro     = micro_batch_size sequences, a divisor of the minibatch (one forward/backward)
Losses are token means over the whole minibatch: each micro-batch's mean is weighted by its share of the
minibatch's answer tokens, so the update does not depend on micro_batch_size.

The lr schedule (warmup_steps, total steps) counts rollouts, like the trainer's step counter; the
several optimizer updates of one rollout share one lr.

The critic-free estimators (GRPO, RLOO) and a Python reward function are parameters of PPOStage
(`estimator`, `score_fn`), see `advantages` and minirlhf/rollout.py. The math is in minirlhf/losses.py
and docs/ppo.md.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minirlhf.build import (
    DTYPES,
    apply_lora,
    build_model,
    build_tokenizer,
    check_same_tokenizer,
    disable_dropout,
    prepare_backbone,
)
from minirlhf.config import Config, ConfigError
from minirlhf.data import (
    BatchIterator,
    build_datasets,
    collate_prompts,
    collate_sft,
    encode_text,
    load_examples,
    pack_documents,
)
from minirlhf.distributed import all_mean, gather_cat, reshard, world_size
from minirlhf.dpo import build_reference
from minirlhf.heads import NotARewardModel, RewardModel
from minirlhf.logprobs import causal_lm_loss
from minirlhf.lora import disable_adapters, lora_layers, merge_and_unload
from minirlhf.losses import (
    approx_kl,
    gae,
    group_normalized_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
)
from minirlhf.model import Transformer
from minirlhf.rollout import (
    RewardModelScorer,
    Rollout,
    ScoreFn,
    decode_rollout,
    generate_rollout,
    micro_batches,
    response_logprobs,
    response_values,
    reward_model_scorer,
)
from minirlhf.sft import save_policy
from minirlhf.tokenizer import Tokenizer
from minirlhf.trainer import Stage, StepResult, Trainer, TrainingError, decay_groups

logger = logging.getLogger(__name__)

ESTIMATORS = ("gae", "grpo", "rloo")


# --------------------------------------------------------------------------------------------------
# KL coefficient


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, kl: float, n_sequences: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta moved towards a target KL (Ziegler et al. 2019, section 2.2):

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),    K_beta = n_sequences / horizon

    KL_t is the rollout's mean per-sequence KL to the reference (nats summed over the answer), and the
    horizon is counted in sequences, so a larger rollout moves beta proportionally more.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_sequences: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_sequences / self.horizon


# --------------------------------------------------------------------------------------------------
# running score statistics


class RunningMoments:
    """Mean and (unbiased) standard deviation of every score seen so far, merged batch by batch with the
    parallel update of Chan, Golub & LeVeque 1979:

        delta = mean_b - mean,   n' = n + n_b,   mean' = mean + delta * n_b / n'
        M2' = M2 + M2_b + delta^2 * n * n_b / n',    std = sqrt(M2 / (n - 1))
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


# --------------------------------------------------------------------------------------------------
# advantages


def advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages [B, N] (and returns [B, N] for the critic, else None) from rewards [B, N].

    gae:  generalized advantage estimation over the critic's values (Schulman et al. 2016, eq. 16).
    grpo: the sequence reward R = sum_t r_t (score minus the KL penalties) normalised within each group of
          `group_size` samples of one prompt (Shao et al. 2024, section 4.1.2), given to every token.
    rloo: R minus the mean R of the other samples of its prompt (Ahmadian et al. 2024), every token.
    The critic-free advantages are sequence-level quantities and stay as their papers define them: the
    stage never whitens them again over tokens (that would give a group whose samples scored alike a
    non-zero advantage whose sign depends on the lengths of other groups' answers).
    """
    if estimator == "gae":
        if values is None:
            raise ValueError("ppo.advantages: estimator 'gae' needs the critic's values")
        return gae(rewards, values, mask, gamma=gamma, lam=lam)
    sequence_reward = (rewards * mask).sum(-1)  # (B,)
    if estimator == "grpo":
        per_sequence = group_normalized_advantages(sequence_reward, group_size)
    elif estimator == "rloo":
        per_sequence = rloo_advantages(sequence_reward, group_size)
    else:
        raise ValueError(f"ppo.advantages: estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    return per_sequence[:, None] * mask.to(rewards.dtype), None


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the answer tokens: 1 = perfect critic, 0 = no better
    than a constant, negative = worse."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


# --------------------------------------------------------------------------------------------------
# the stage


class PolicyAndCritic(nn.Module):
    """The module that owns every trainable parameter (the trainer checkpoints its trainable ones):
    the policy and, when there is one, the critic."""

    def __init__(self, policy: Transformer, critic: RewardModel | None):
        super().__init__()
        self.policy = policy
        self.critic = critic


class PPOStage(Stage):
    """Rollout, advantages and PPO epochs for one trainer step.

    policy:     the model being trained (LoRA adapters injected or not)
    score_fn:   rollout -> [B] scores (rollout.reward_model_scorer, rollout.text_scorer, ...)
    critic:     value model for "gae"; None for the critic-free estimators
    reference:  a frozen reference policy; None = the policy with its adapters disabled (needs LoRA)
    prompts:    encoded prompts ({"input_ids"}), eval_prompts likewise (scored at the end / eval_every)
    ptx:        resumable iterator of pretraining micro-batches for the ptx loss, or None
    estimator:  "gae" | "grpo" | "rloo"
    """

    def __init__(self, cfg: Config, policy: Transformer, tok: Tokenizer, prompts: list[dict], score_fn: ScoreFn,
                 critic: RewardModel | None = None, reference: Transformer | None = None,
                 eval_prompts: list[dict] | None = None, ptx: BatchIterator | None = None, estimator: str = "gae"):
        p = cfg.ppo
        if estimator not in ESTIMATORS:
            raise ValueError(f"PPOStage: estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if estimator == "gae" and critic is None:
            raise ValueError("PPOStage: estimator 'gae' needs a critic")
        if estimator == "rloo" and p.samples_per_prompt < 2:
            raise ConfigError(f"[ppo] samples_per_prompt must be >= 2 for rloo, got {p.samples_per_prompt}",
                              "ppo", "samples_per_prompt")
        if reference is None and not any(True for _ in lora_layers(policy)):
            raise ValueError("PPOStage: without LoRA adapters the policy cannot be its own reference; "
                             "pass a frozen reference model")
        if len(prompts) < p.prompts_per_rollout:
            raise ConfigError(f"[ppo] prompts_per_rollout must be <= the {len(prompts)} training prompts, got "
                              f"{p.prompts_per_rollout}", "ppo", "prompts_per_rollout")
        if p.ptx_coef > 0 and ptx is None:
            raise ValueError("PPOStage: [ppo] ptx_coef > 0 needs the ptx batches")
        if p.reward_norm == "rm":
            scorer_rm = score_fn.reward_model if isinstance(score_fn, RewardModelScorer) else None
            if scorer_rm is None or scorer_rm.reward_mean is None or not scorer_rm.reward_std > 0:
                raise ConfigError(f"[ppo] reward_norm = \"rm\" needs a reward model with the score statistics the rm "
                                  f"stage saves, std > 0 (minirlhf_reward_stats in {p.reward_model}/config.json); "
                                  f"use \"running\" or \"none\"", "ppo", "reward_norm")
        self.cfg, self.tok, self.score_fn, self.estimator = cfg, tok, score_fn, estimator
        self.policy, self.critic = policy, critic
        self.model = PolicyAndCritic(policy, critic)
        # the reference is a frozen model, or the policy itself run inside disable_adapters
        self.reference = reference if reference is not None else policy
        self.reference_context = nullcontext if reference is not None else functools.partial(disable_adapters, policy)
        collate = functools.partial(collate_prompts, pad_id=tok.pad_id)
        self.batches = BatchIterator(prompts, p.prompts_per_rollout, collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle, drop_last=True)
        self.eval_prompts = eval_prompts or []
        self.ptx = ptx
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.reward_moments = RunningMoments()
        self.stop_ids = list(tok.stop_ids)
        # under torchrun, distributed.prepare_stage swaps in a context that gathers the sharded policy
        self.generation_context = nullcontext

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen reference copy (not when it is the policy with adapters off) and the reward model
        inside a reward_model_scorer (not a text scorer's Python function)."""
        out = [self.reference] if self.reference is not self.policy else []
        if isinstance(self.score_fn, RewardModelScorer):
            out.append(self.score_fn.reward_model)
        return out

    # -- optimizer and resume ------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """Policy at [train] lr, critic at [ppo] critic_lr (train.lr when 0): four AdamW groups."""
        groups = decay_groups(self.policy)
        if self.critic is not None:
            groups += decay_groups(self.critic, lr=self.cfg.ppo.critic_lr or self.cfg.train.lr)
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "reward_moments": self.reward_moments.state_dict(),
                "ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_moments.load_state_dict(state["reward_moments"])
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.load_state_dict(state["ptx"])

    # -- rollout -------------------------------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, prompts: dict[str, torch.Tensor], autocast: Callable = nullcontext) -> tuple[Rollout, dict]:
        """Generate, then fill log-probs, reference log-probs, values and scores. Returns the rollout and
        the seconds spent generating and scoring."""
        p = self.cfg.ppo
        start = time.perf_counter()
        with self.generation_context():
            rollout, _ = generate_rollout(self.policy, prompts["input_ids"], prompts["attention_mask"],
                                          samples_per_prompt=p.samples_per_prompt, max_new_tokens=p.max_new_tokens,
                                          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                          stop_ids=self.stop_ids, pad_id=self.tok.pad_id)
        generated = _sync_time(rollout.input_ids)
        was_training = self.model.training
        self.model.eval()  # old log-probs without dropout (ratio 1 at the first update when dropout is 0)
        try:
            logprobs, ref_logprobs, values, entropy = [], [], [], []
            P = rollout.prompt_len
            for rows in micro_batches(rollout.size, p.micro_batch_size):
                rows = rows.to(rollout.input_ids.device)
                ids, mask, resp = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
                with autocast():
                    lp, ent = response_logprobs(self.policy, ids, mask, resp, P, p.temperature, with_entropy=True)
                    with self.reference_context():
                        ref, _ = response_logprobs(self.reference, ids, mask, resp, P, p.temperature)
                    if self.critic is not None:
                        values.append(response_values(self.critic, ids, mask, resp, P).float())
                logprobs.append(lp.float())
                ref_logprobs.append(ref.float())
                entropy.append(ent)
            if self.reference is not self.policy:
                reshard(self.reference)  # a sharded frozen copy's gathered weights (no backward frees them)
            rollout.logprobs, rollout.ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
            rollout.entropy = torch.cat(entropy)
            rollout.values = torch.cat(values) if values else None
            with autocast():
                rollout.raw_scores = self.score_fn(rollout).float()
            rollout.scores = self.shape_scores(rollout.raw_scores, rollout.has_stop)
        finally:
            self.model.train(was_training)
        scored = _sync_time(rollout.scores)
        return rollout, {"time/generate": generated - start, "time/score": scored - generated}

    def shape_scores(self, scores: torch.Tensor, has_stop: torch.Tensor) -> torch.Tensor:
        """Raw scores -> final rewards: normalised (reward_norm "running": by the mean/std of every score so
        far; "rm": by the reward model's training-set mean/std, fixed), minus missing_eos_penalty for answers
        without a stop token, clipped to +-reward_clip (when > 0)."""
        p = self.cfg.ppo
        if p.reward_norm == "running":
            self.reward_moments.update(gather_cat(scores))  # every rank's scores: one running mean
            scores = self.reward_moments.normalize(scores)
        elif p.reward_norm == "rm":
            scores = self.score_fn.reward_model.normalize(scores)
        scores = scores - p.missing_eos_penalty * (~has_stop).to(scores.dtype)
        if p.reward_clip > 0:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        return scores

    def compute_advantages(self, rollout: Rollout, kl_coef: float) -> None:
        """Fill rollout.rewards, .advantages and .returns. GAE's advantages are whitened over the rollout's
        answer tokens when whiten_advantages; the critic-free ones never are (see `advantages`)."""
        p = self.cfg.ppo
        mask = rollout.response_mask
        rollout.rewards = kl_penalized_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                               kl_coef=kl_coef, estimator=p.kl_estimator)
        adv, rollout.returns = advantages(self.estimator, rollout.rewards, mask, rollout.values, gamma=p.gamma,
                                          lam=p.lam, group_size=p.samples_per_prompt)
        if self.estimator == "gae" and p.whiten_advantages and int(mask.sum()) > 1:
            adv = masked_whiten(adv, mask)
        rollout.advantages = adv

    # -- PPO epochs ----------------------------------------------------------------------------

    def micro_batch_loss(self, batch: Rollout, token_share: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss on one micro-batch (a Rollout slice), scaled by
        its share of the minibatch's answer tokens. Metrics come back detached and unscaled."""
        p = self.cfg.ppo
        mask = batch.response_mask
        logprobs, _ = response_logprobs(self.policy, batch.input_ids, batch.attention_mask, mask,
                                        batch.prompt_len, p.temperature)
        pg_loss, pg_clipfrac = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, clip_eps=p.clip_eps)
        loss = pg_loss
        metrics = {"policy_loss": pg_loss.detach(), "policy_clipfrac": pg_clipfrac,
                   "approx_kl": approx_kl(logprobs.detach(), batch.logprobs, mask)}
        if self.critic is not None:
            values = response_values(self.critic, batch.input_ids, batch.attention_mask, mask, batch.prompt_len)
            clip = p.value_clip_eps if p.value_clip_eps > 0 else float("inf")
            vf_loss, vf_clipfrac = ppo_value_loss(values, batch.values, batch.returns, mask, clip_eps=clip)
            loss = loss + p.vf_coef * vf_loss
            metrics.update(value_loss=vf_loss.detach(), value_clipfrac=vf_clipfrac)
        return loss * token_share, metrics

    def ppo_epochs(self, rollout: Rollout, trainer: Trainer) -> dict[str, float]:
        """ppo_epochs passes over the shuffled rollout, one optimizer update per minibatch; stops early
        once a minibatch's approximate KL to the rollout policy passes early_stop_kl."""
        p = self.cfg.ppo
        sums: dict[str, float] = {}
        updates, stopped = 0, False
        n_micro = p.minibatch_size // p.micro_batch_size
        for _ in range(p.ppo_epochs):
            order = torch.randperm(rollout.size)
            for start in range(0, rollout.size, p.minibatch_size):
                rows = order[start: start + p.minibatch_size]
                tokens = float(rollout.response_mask[rows.to(rollout.response_mask.device)].sum())
                minibatch: dict[str, float] = {}
                for micro in rows.split(p.micro_batch_size):
                    batch = rollout.select(micro)
                    share = float(batch.response_mask.sum()) / tokens
                    with trainer.autocast():
                        loss, metrics = self.micro_batch_loss(batch, share)
                        weights = dict.fromkeys(metrics, share)  # token means over the minibatch
                        if self.ptx is not None:
                            ptx_loss = causal_lm_loss(self.policy, trainer.to_device(next(self.ptx)))
                            loss = loss + p.ptx_coef * ptx_loss / n_micro
                            metrics["ptx_loss"], weights["ptx_loss"] = ptx_loss.detach(), 1.0 / n_micro
                    trainer.backward(loss, metrics)
                    for k, v in metrics.items():
                        minibatch[k] = minibatch.get(k, 0.0) + float(v) * weights[k]
                    minibatch["loss"] = minibatch.get("loss", 0.0) + float(loss.detach())
                minibatch.update(trainer.optimizer_step(advance_schedule=False))
                updates += 1
                for k, v in minibatch.items():
                    sums[k] = sums.get(k, 0.0) + v
                if p.early_stop_kl > 0 and all_mean(minibatch["approx_kl"]) > p.early_stop_kl:  # ranks agree
                    stopped = True
                    break
            if stopped:
                break
        trainer.scheduler.step()  # the lr schedule counts rollouts, not updates
        out = {k: v / updates for k, v in sums.items()}
        out.update(updates=float(updates), early_stopped=float(stopped))
        return out

    # -- one trainer step ----------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        """One rollout per trainer step: a pass over the prompts is this many steps."""
        return self.batches.batches_per_epoch

    def train_step(self, trainer: Trainer) -> StepResult:
        prompts = trainer.to_device(next(self.batches))
        kl_coef = self.kl_ctl.value
        try:
            rollout, timings = self.make_rollout(prompts, trainer.autocast)
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities
            if "nan" not in str(e) or "inf" not in str(e):
                raise
            raise non_finite_error(trainer, "sampling probabilities (the policy's logits)") from None
        bad = non_finite_parts(rollout)
        if all_mean(float(bool(bad))) > 0:  # every rank stops, not only the one that saw it
            raise non_finite_error(trainer, " and ".join(bad) or "values on another rank")
        self.compute_advantages(rollout, kl_coef)
        start = time.perf_counter()
        train_metrics = self.ppo_epochs(rollout, trainer)
        timings["time/train"] = _sync_time(rollout.input_ids) - start

        mask = rollout.response_mask
        kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1).mean()  # k1, nats per sequence
        self.kl_ctl.update(all_mean(float(kl)), rollout.size * world_size())  # the same beta on every rank
        metrics = {
            "score/mean": float(rollout.raw_scores.mean()),
            "score/std": float(rollout.raw_scores.std()) if rollout.size > 1 else 0.0,
            "reward/mean": float(rollout.scores.mean()),
            "kl": float(kl),
            "kl_coef": kl_coef,
            "entropy": float(masked_mean(rollout.entropy, mask)),
            "response_length": float(mask.sum(-1).float().mean()),
            "eos_fraction": float(rollout.has_stop.float().mean()),
            **train_metrics,
            **timings,
        }
        if rollout.values is not None:
            metrics["value/mean"] = float(masked_mean(rollout.values, mask))
            metrics["explained_variance"] = explained_variance(rollout.values, rollout.returns, mask)
        every = self.cfg.ppo.log_samples_every
        if every and (trainer.step + 1) % every == 0 and trainer.is_main:
            self.log_samples(rollout, trainer.step + 1)
        return StepResult(metrics, int(rollout.attention_mask.sum()))

    def log_samples(self, rollout: Rollout, step: int, count: int = 4) -> None:
        """Append a few (prompt, answer, score) rows of this rollout to OUTPUT/samples.jsonl."""
        rows = torch.arange(min(count, rollout.size))
        prompts, answers = decode_rollout(self.tok, rollout.select(rows))
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "a") as f:
            for i, (prompt, answer) in enumerate(zip(prompts, answers)):
                f.write(json.dumps({"step": step, "prompt": prompt, "response": answer,
                                    "score": float(rollout.raw_scores[i]), "reward": float(rollout.scores[i])}) + "\n")

    # -- eval and saving -----------------------------------------------------------------------

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Mean score of greedy answers to the eval prompts (greedy, so the RNG stream is untouched)."""
        if not self.eval_prompts:
            return {}
        p = self.cfg.ppo
        scores, lengths = [], []
        collate = functools.partial(collate_prompts, pad_id=self.tok.pad_id)
        for start in range(0, len(self.eval_prompts), p.minibatch_size):
            prompts = trainer.to_device(collate(self.eval_prompts[start: start + p.minibatch_size]))
            with self.generation_context():
                rollout, _ = generate_rollout(self.policy, prompts["input_ids"], prompts["attention_mask"],
                                              max_new_tokens=p.max_new_tokens, temperature=0.0,
                                              stop_ids=self.stop_ids, pad_id=self.tok.pad_id)
            scores.append(self.score_fn(rollout).float().cpu())
            lengths.append(rollout.response_mask.sum(-1).float().cpu())
        return {"score": float(torch.cat(scores).mean()), "response_length": float(torch.cat(lengths).mean())}

    def save_final(self, out_dir: Path) -> None:
        """The policy (HF model or LoRA adapter, with the tokenizer) in out_dir, the critic as a full reward
        model with the tokenizer in out_dir/critic (its adapter merged into a copy)."""
        save_policy(self.policy, self.tok, out_dir, self.cfg.model.path)
        if self.critic is not None:
            critic = self.critic
            if any(True for _ in lora_layers(critic)):
                critic = copy.deepcopy(critic)
                merge_and_unload(critic.backbone)
            critic.save_pretrained(Path(out_dir) / "critic", tokenizer=self.tok)


def non_finite_parts(rollout: Rollout) -> list[str]:
    """Names of the rollout's measured tensors that hold a NaN or inf (one device sync)."""
    parts = {"policy log-probs": rollout.logprobs, "reference log-probs": rollout.ref_logprobs,
             "critic values": rollout.values, "scores": rollout.raw_scores}
    parts = {k: v for k, v in parts.items() if v is not None}
    finite = torch.stack([torch.isfinite(v).all() for v in parts.values()]).tolist()
    return [name for name, ok in zip(parts, finite) if not ok]


def non_finite_error(trainer: Trainer, what: str) -> TrainingError:
    """The one-line error of a rollout that went non-finite: where, and the checkpoint to go back to."""
    kept = f"the last good checkpoint is {trainer.last_checkpoint}" if trainer.last_checkpoint else \
        "no checkpoint was written yet"
    return TrainingError(f"non-finite {what} in the rollout of step {trainer.step + 1}; {kept}. Try a lower lr, "
                         f"fp32 precision, or check the models.")


def _sync_time(like: torch.Tensor) -> float:
    """perf_counter after the device has finished its queued work (timings of CUDA code need this)."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------------------
# from a config


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def load_scalar_model(cfg: Config, tok: Tokenizer, path: str, key: str, dtype: torch.dtype | None,
                      device: torch.device | str) -> RewardModel:
    """The reward model ([ppo] reward_model: a saved reward model, nothing else) or the critic's start
    ([ppo] critic_model, or the reward model: a causal LM gets a fresh head), checked against the policy's
    tokenizer: the embeddings must hold its ids and a tokenizer saved with the model must be the same."""
    try:
        model = RewardModel.from_pretrained(path, dtype=dtype, device=device, seed=cfg.train.seed,
                                            new_head=key != "reward_model")
    except NotARewardModel as e:
        raise ConfigError(f"[ppo] {key}: {e}", "ppo", key) from None
    prepare_backbone(cfg, tok, model.backbone, path, "ppo", key)
    check_same_tokenizer(tok, path, "ppo", key)
    return model


def build_stage(cfg: Config, device: torch.device | str = "cpu") -> PPOStage:
    """Policy ([model] path + [lora]), reference, critic (from [ppo] critic_model or reward_model, with its
    own adapter when [lora] is on), frozen reward model, prompts, and the ptx data when ptx_coef > 0.
    With [train] disable_dropout, no model has dropout (build.disable_dropout)."""
    p = cfg.ppo
    tok = build_tokenizer(cfg)
    policy = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device)))
    ref = build_reference(cfg, policy, p.ref_model, "ppo", device)
    reference = None if ref.adapters_off else ref.model  # None: the policy with its adapters disabled

    dtype = DTYPES[cfg.model.dtype]
    reward_dtype = DTYPES[p.reward_dtype] if p.reward_dtype != "auto" else dtype
    reward_model = _frozen(load_scalar_model(cfg, tok, p.reward_model, "reward_model", reward_dtype, device))
    critic = None
    if p.estimator == "gae":
        key = "critic_model" if p.critic_model else "reward_model"
        critic = load_scalar_model(cfg, tok, p.critic_model or p.reward_model, key, dtype, device)
        logger.info("ppo: critic from %s", p.critic_model or p.reward_model)
        # the policy's [lora] settings minus the LM head (the critic has none); the value head trains in full
        disable_dropout(cfg, apply_lora(cfg, critic.backbone))

    data = build_datasets(cfg, tok)
    ptx = None
    if p.ptx_coef > 0:
        encode = functools.partial(encode_text, tok=tok, data=cfg.data, add_bos=cfg.pt.add_bos)
        docs, _ = load_examples(p.ptx_files, encode, cfg.data.skip_bad_rows, cfg.data.num_workers)
        blocks = pack_documents(docs, cfg.data.block_size)
        if not blocks:
            raise ConfigError(f"[ppo] ptx_files {p.ptx_files} hold no text", "ppo", "ptx_files")
        ptx = BatchIterator(blocks, p.micro_batch_size, functools.partial(collate_sft, pad_id=tok.pad_id),
                            seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    score_fn = reward_model_scorer(reward_model, p.micro_batch_size)
    return PPOStage(cfg, policy, tok, data.train, score_fn, critic=critic, reference=reference,
                    eval_prompts=data.eval, ptx=ptx, estimator=p.estimator)
