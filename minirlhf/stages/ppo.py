"""The ppo stage: RLHF with a reward model and PPO (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT).
This file holds the optimisation (advantages, PPO epochs, KL control); the experience it trains on comes
from stages/rollout.py, the formulas from losses/ppo.py (docs/ppo.md has the whole step).

One trainer step is one rollout and its PPO epochs:

    prompts_per_rollout prompts --generate samples_per_prompt answers each--> rollout of B sequences
    score (reward model) + per-token KL penalty to the reference  -> rewards        (losses.kl_penalized_rewards)
    GAE over the critic's values, or grpo / rloo without one        -> advantages   (losses.ppo_advantages)
    ppo_epochs x (shuffle; minibatch_size sequences per optimizer update;
                  micro_batch_size sequences per forward/backward)   clipped policy + value losses

Four models: the policy and the reference share one base when LoRA is on (the reference is the policy with
its adapter disabled; a frozen copy when training fully), the critic starts from the reward model with its
own adapter (or its own weights), and the reward model is frozen (in [ppo] reward_dtype).

The batch hierarchy, checked by PPOSection.validate:
    rollout   = prompts_per_rollout * samples_per_prompt sequences    (one trainer step, one lr step)
    minibatch = minibatch_size sequences, a divisor of the rollout    (one optimizer update)
    micro     = micro_batch_size sequences, a divisor of the minibatch (one forward/backward)
Losses are token means over the whole minibatch: each micro-batch's mean is weighted by its share of the
minibatch's answer tokens, so the update does not depend on micro_batch_size.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minirlhf.batching import BatchIterator, collate_prompts, collate_sft
from minirlhf.build import DTYPES, apply_lora, build_model, build_tokenizer, disable_dropout, load_scalar_model
from minirlhf.config import Config
from minirlhf.data import build_datasets, load_text_blocks
from minirlhf.distributed import all_mean, world_size
from minirlhf.heads import RewardModel
from minirlhf.logprobs import causal_lm_loss
from minirlhf.lora import has_lora, merge_and_unload
from minirlhf.losses import (
    PPO_ESTIMATORS,
    approx_kl,
    explained_variance,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_advantages,
    ppo_policy_loss,
    ppo_value_loss,
)
from minirlhf.model import Transformer
from minirlhf.optimization import decay_groups
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import Reference, build_reference, non_finite_error, non_finite_sampling, save_policy
from minirlhf.stages.rollout import (
    RewardModelScorer,
    Rollout,
    ScoreFn,
    ScoreShaping,
    append_samples,
    greedy_rollouts,
    make_rollout,
    non_finite_parts,
    response_logprobs,
    response_values,
    sync_time,
)
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import ConfigError, check, check_choice, setting, toml_value
from minirlhf.trainer import Stage, StepResult, Trainer

logger = logging.getLogger(__name__)

@dataclass
class PPOSection(StageSection):
    section = "ppo"
    reward_model: str = setting("", "reward model directory (output of the rm stage); required", path=True)
    critic_model: str = setting("", "critic initialisation; empty = the reward model", path=True)
    ref_model: str = setting("", "reference policy for the KL penalty; empty = the starting model", path=True)
    prompts_per_rollout: int = setting(64, "prompts sampled per rollout")
    samples_per_prompt: int = setting(1, "completions generated per prompt")
    minibatch_size: int = setting(16, "rollout sequences per optimizer step")
    micro_batch_size: int = setting(4, "sequences per forward/backward (train.micro_batch_size is not used by ppo)")
    ppo_epochs: int = setting(1, "passes over each rollout")
    clip_eps: float = setting(0.2, "policy ratio clip epsilon (Schulman et al. 2017, eq. 7)")
    value_clip_eps: float = setting(0.2, "value clip range around the rollout values; 0 = no value clipping")
    gamma: float = setting(1.0, "discount factor")
    lam: float = setting(0.95, "GAE lambda (Schulman et al. 2016, eq. 16)")
    kl_coef: float = setting(0.05, "initial KL penalty coefficient beta (Ziegler et al. 2019, eq. 2)")
    adaptive_kl: bool = setting(False, "adapt kl_coef towards target_kl (Ziegler et al. 2019, sec. 2.2)")
    target_kl: float = setting(6.0, "adaptive KL target (nats per sequence)")
    kl_horizon: int = setting(10000, "adaptive KL horizon K_beta (in sequences)")
    kl_estimator: str = setting("k1", "per-token KL estimate: k1 = log p - log q | k3 = (r - 1) - log r "
                                      "(Schulman 2020)")
    whiten_advantages: bool = setting(True, "estimator gae: normalise advantages to zero mean, unit variance over the "
                                            "rollout's answer tokens (grpo and rloo are never re-whitened)")
    reward_norm: str | bool = setting("none", "normalise scores before the KL penalty: none | running (mean/std of "
                                              "every score so far) | rm (the reward model's training-set mean/std "
                                              "saved by the rm stage); older configs' true / false mean running / none")
    reward_clip: float = setting(0.0, "clip scores to [-reward_clip, reward_clip]; 0 = off")
    ptx_coef: float = setting(0.0, "weight of the pretraining loss mixed into the policy loss (InstructGPT eq. 2)")
    ptx_files: list[str] = setting([], "pretraining text for ptx_coef > 0 (same formats as pt)", path=True)
    max_new_tokens: int = setting(128, "longest generated answer")
    temperature: float = setting(1.0, "sampling temperature of rollouts")
    top_k: int = setting(0, "sample from the k most likely tokens; 0 = off")
    top_p: float = setting(1.0, "nucleus sampling mass; 1 = off")
    missing_eos_penalty: float = setting(0.0, "subtracted from the score of answers that never emit EOS")
    early_stop_kl: float = setting(0.0, "stop the PPO epochs of a rollout once its mean KL passes this; 0 = off")
    vf_coef: float = setting(0.1, "weight of the value loss")
    critic_lr: float = setting(0.0, "critic learning rate; 0 = train.lr")
    log_samples_every: int = setting(10, "rollouts between logged sample generations; 0 = never")
    estimator: str = setting("gae", "advantages: gae (with the critic) | grpo (group-normalised, Shao et al. 2024) | "
                                    "rloo (leave-one-out, Ahmadian et al. 2024); the last two need no critic")
    reward_dtype: str = setting("auto", "dtype of the frozen reward model: auto ([model] dtype) | float32 | bfloat16 "
                                        "| float16")

    def validate(self) -> None:
        s = self.section
        for key in ("prompts_per_rollout", "samples_per_prompt", "minibatch_size", "micro_batch_size",
                    "ppo_epochs", "max_new_tokens", "kl_horizon"):
            check(getattr(self, key) >= 1, s, key, ">= 1", getattr(self, key))
        for key in ("value_clip_eps", "kl_coef", "reward_clip", "ptx_coef", "missing_eos_penalty",
                    "early_stop_kl", "vf_coef", "critic_lr"):
            check(getattr(self, key) >= 0, s, key, ">= 0", getattr(self, key))
        check(self.clip_eps > 0, s, "clip_eps", "> 0", self.clip_eps)
        check(0.0 <= self.gamma <= 1.0, s, "gamma", "in [0, 1]", self.gamma)
        check(0.0 <= self.lam <= 1.0, s, "lam", "in [0, 1]", self.lam)
        check(self.target_kl > 0, s, "target_kl", "> 0", self.target_kl)
        check_choice(s, "kl_estimator", self.kl_estimator, ("k1", "k3"))
        if isinstance(self.reward_norm, bool):  # configs written before "rm" existed: true = running
            self.reward_norm = "running" if self.reward_norm else "none"
        check_choice(s, "reward_norm", self.reward_norm, ("none", "running", "rm"))
        check(self.temperature > 0, s, "temperature", "> 0 (rollout log-probs need a proper distribution)",
              self.temperature)
        check(self.top_k >= 0, s, "top_k", ">= 0", self.top_k)
        check(0.0 < self.top_p <= 1.0, s, "top_p", "in (0, 1]", self.top_p)
        check(self.log_samples_every >= 0, s, "log_samples_every", ">= 0", self.log_samples_every)
        check_choice(s, "estimator", self.estimator, PPO_ESTIMATORS)
        check_choice(s, "reward_dtype", self.reward_dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ConfigError(f"[{s}] samples_per_prompt must be >= 2 for estimator = "
                              f"{toml_value(self.estimator)} (it compares samples of one prompt), got "
                              f"{self.samples_per_prompt}", s, "samples_per_prompt")
        # rollout -> minibatches (one optimizer step each) -> micro-batches (one forward/backward each)
        rollout = self.prompts_per_rollout * self.samples_per_prompt
        if rollout % self.minibatch_size:
            raise ConfigError(
                f"[{s}] minibatch_size must divide prompts_per_rollout * samples_per_prompt = "
                f"{self.prompts_per_rollout} * {self.samples_per_prompt} = {rollout}, got {self.minibatch_size}",
                s, "minibatch_size")
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(f"[{s}] micro_batch_size must divide minibatch_size = {self.minibatch_size}, "
                              f"got {self.micro_batch_size}", s, "micro_batch_size")

    def validate_run(self, cfg: Config) -> None:
        if not self.reward_model:
            raise ConfigError("[ppo] reward_model must be set for stage ppo, got \"\"", "ppo", "reward_model")
        if self.ptx_coef > 0 and not self.ptx_files:
            raise ConfigError(f"[ppo] ptx_files must list pretraining files when ptx_coef > 0, got [] "
                              f"(ptx_coef = {toml_value(self.ptx_coef)})", "ppo", "ptx_files")

    def longest_row(self, cfg: Config) -> tuple[int, str, str]:
        """The prompt plus the answer, or a ptx block when longer."""
        rollout = cfg.data.cutoff_len + self.max_new_tokens
        if self.ptx_coef > 0 and cfg.data.block_size > rollout:
            return cfg.data.block_size, "data", "block_size"
        return rollout, "ppo", "max_new_tokens"


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
    score_fn:   rollout -> [B] scores (rollout.RewardModelScorer, rollout.text_scorer, ...)
    reference:  the reference policy of the KL penalty (stages/common.py: a frozen copy, or the policy with
                its adapters disabled)
    critic:     value model for "gae"; None for the critic-free estimators
    prompts:    encoded prompts ({"input_ids"}), eval_prompts likewise (scored at the end / eval_every)
    ptx:        resumable iterator of pretraining micro-batches for the ptx loss, or None
    The advantage estimator is [ppo] estimator (validated with the config).
    """

    def __init__(self, cfg: Config, policy: Transformer, tok: Tokenizer, prompts: list[dict], score_fn: ScoreFn,
                 reference: Reference, critic: RewardModel | None = None, eval_prompts: list[dict] | None = None,
                 ptx: BatchIterator | None = None):
        p = cfg.ppo
        if p.estimator == "gae" and critic is None:
            raise ValueError("PPOStage: estimator 'gae' needs a critic")
        if len(prompts) < p.prompts_per_rollout:
            raise ConfigError(f"[ppo] prompts_per_rollout must be <= the {len(prompts)} training prompts, got "
                              f"{p.prompts_per_rollout}", "ppo", "prompts_per_rollout")
        if p.ptx_coef > 0 and ptx is None:
            raise ValueError("PPOStage: [ppo] ptx_coef > 0 needs the ptx batches")
        scorer_rm = score_fn.reward_model if isinstance(score_fn, RewardModelScorer) else None
        if p.reward_norm == "rm":
            if scorer_rm is None or scorer_rm.reward_mean is None or not scorer_rm.reward_std > 0:
                raise ConfigError(f"[ppo] reward_norm = \"rm\" needs a reward model with the score statistics the rm "
                                  f"stage saves, std > 0 (minirlhf_reward_stats in {p.reward_model}/config.json); "
                                  f"use \"running\" or \"none\"", "ppo", "reward_norm")
        self.cfg, self.tok, self.score_fn, self.estimator = cfg, tok, score_fn, p.estimator
        self.policy, self.critic, self.reference = policy, critic, reference
        self.model = PolicyAndCritic(policy, critic)
        collate = functools.partial(collate_prompts, pad_id=tok.pad_id)
        self.batches = BatchIterator(prompts, p.prompts_per_rollout, collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle, drop_last=True)
        self.eval_prompts = eval_prompts or []
        self.ptx = ptx
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.shaping = ScoreShaping(p.reward_norm, scorer_rm, p.missing_eos_penalty, p.reward_clip)
        self.stop_ids = list(tok.stop_ids)

    def iterators(self) -> list[BatchIterator]:
        """The prompt batches, and the pretraining batches of the ptx loss."""
        return [self.batches] + ([self.ptx] if self.ptx is not None else [])

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen reference copy (not when it is the policy with adapters off) and the reward model
        inside a RewardModelScorer (not a text scorer's Python function)."""
        out = self.reference.frozen_modules()
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
        return {"kl_ctl": self.kl_ctl.state_dict(), "reward_moments": self.shaping.moments.state_dict(),
                "ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.shaping.moments.load_state_dict(state["reward_moments"])
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.load_state_dict(state["ptx"])

    # -- experience ----------------------------------------------------------------------------

    def experience(self, prompts: dict[str, torch.Tensor], trainer: Trainer) -> tuple[Rollout, dict[str, float]]:
        """One rollout (rollout.make_rollout: answers sampled and measured by the policy, the reference and
        the critic), scored (score_fn) and shaped into rewards (ScoreFn -> ScoreShaping). Returns the rollout
        and the seconds spent generating and scoring."""
        p = self.cfg.ppo
        start = time.perf_counter()
        rollout, generating = make_rollout(
            self.policy, prompts, samples_per_prompt=p.samples_per_prompt, max_new_tokens=p.max_new_tokens,
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, stop_ids=self.stop_ids, pad_id=self.tok.pad_id,
            micro_batch_size=p.micro_batch_size, reference=self.reference, critic=self.critic,
            autocast=trainer.autocast, dist=trainer.dist)
        with trainer.autocast():
            rollout.raw_scores = self.score_fn(rollout).float()
        rollout.scores = self.shaping(rollout.raw_scores, rollout.has_stop)
        took = sync_time(rollout.scores) - start
        return rollout, {"time/generate": generating, "time/score": took - generating}

    def compute_advantages(self, rollout: Rollout, kl_coef: float) -> None:
        """Fill rollout.rewards, .advantages and .returns. GAE's advantages are whitened over the rollout's
        answer tokens when whiten_advantages; the critic-free ones never are (see losses.ppo_advantages)."""
        p = self.cfg.ppo
        mask = rollout.response_mask
        rollout.rewards = kl_penalized_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                               kl_coef=kl_coef, estimator=p.kl_estimator)
        adv, rollout.returns = ppo_advantages(self.estimator, rollout.rewards, mask, rollout.values, gamma=p.gamma,
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
                minibatch.update(trainer.optimizer_step())
                updates += 1
                for k, v in minibatch.items():
                    sums[k] = sums.get(k, 0.0) + v
                if p.early_stop_kl > 0 and all_mean(minibatch["approx_kl"]) > p.early_stop_kl:  # ranks agree
                    stopped = True
                    break
            if stopped:
                break
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
        with non_finite_sampling(trainer):
            rollout, timings = self.experience(prompts, trainer)
        bad = non_finite_parts(rollout)
        if all_mean(float(bool(bad))) > 0:  # every rank stops, not only the one that saw it
            raise non_finite_error(trainer, " and ".join(bad) or "values on another rank")
        self.compute_advantages(rollout, kl_coef)
        start = time.perf_counter()
        train_metrics = self.ppo_epochs(rollout, trainer)
        timings["time/train"] = sync_time(rollout.input_ids) - start

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
            samples = Path(self.cfg.train.output_dir) / "samples.jsonl"
            with trainer.writing(samples):
                append_samples(samples, self.tok, rollout, trainer.step + 1)
        return StepResult(metrics, int(rollout.attention_mask.sum()))

    # -- eval and saving -----------------------------------------------------------------------

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Mean score of greedy answers to the eval prompts (greedy, so the RNG stream is untouched)."""
        if not self.eval_prompts:
            return {}
        p = self.cfg.ppo
        scores, lengths = [], []
        for _, rollout in greedy_rollouts(self.policy, self.eval_prompts, p.minibatch_size, p.max_new_tokens,
                                       self.stop_ids, self.tok.pad_id, trainer.to_device, trainer.dist):
            scores.append(self.score_fn(rollout).float().cpu())
            lengths.append(rollout.response_mask.sum(-1).float().cpu())
        return {"score": float(torch.cat(scores).mean()), "response_length": float(torch.cat(lengths).mean())}

    def save_final(self, out_dir: Path, model: PolicyAndCritic) -> None:
        """The policy (HF model or LoRA adapter, with the tokenizer) in out_dir, the critic as a full reward
        model with the tokenizer in out_dir/critic (its adapter merged into a copy)."""
        save_policy(model.policy, self.tok, out_dir, self.cfg.model.path)
        if model.critic is not None:
            critic = model.critic
            if has_lora(critic):
                critic = copy.deepcopy(critic)
                merge_and_unload(critic.backbone)
            critic.save_pretrained(Path(out_dir) / "critic", tokenizer=self.tok)


# --------------------------------------------------------------------------------------------------
# from a config


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> PPOStage:
    """Policy ([model] path + [lora]), reference, critic (from [ppo] critic_model or reward_model, with its
    own adapter when [lora] is on), frozen reward model, prompts, and the ptx data when ptx_coef > 0.
    With [train] disable_dropout, no model has dropout (build.disable_dropout)."""
    p = cfg.ppo
    tok = build_tokenizer(cfg)
    policy = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device)))
    reference = build_reference(cfg, tok, policy, p.ref_model, "ppo", device)

    dtype = DTYPES[cfg.model.dtype]
    reward_dtype = DTYPES[p.reward_dtype] if p.reward_dtype != "auto" else dtype
    reward_model = load_scalar_model(cfg, tok, p.reward_model, "ppo", "reward_model", reward_dtype, device)
    reward_model.requires_grad_(False)
    reward_model.eval()
    critic = None
    if p.estimator == "gae":
        key = "critic_model" if p.critic_model else "reward_model"
        critic = load_scalar_model(cfg, tok, p.critic_model or p.reward_model, "ppo", key, dtype, device,
                                   new_head=bool(p.critic_model))
        logger.info("ppo: critic from %s", p.critic_model or p.reward_model)
        # the policy's [lora] settings minus the LM head (the critic has none); the value head trains in full
        disable_dropout(cfg, apply_lora(cfg, critic.backbone))

    data = build_datasets(cfg, tok, SPECS["ppo"].data_formats)
    ptx = None
    if p.ptx_coef > 0:
        blocks = load_text_blocks(p.ptx_files, tok, cfg.data, add_bos=cfg.pt.add_bos)
        if not blocks:
            raise ConfigError(f"[ppo] ptx_files {p.ptx_files} hold no text", "ppo", "ptx_files")
        ptx = BatchIterator(blocks, p.micro_batch_size, functools.partial(collate_sft, pad_id=tok.pad_id),
                            seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    score_fn = RewardModelScorer(reward_model, p.micro_batch_size)
    return PPOStage(cfg, policy, tok, data.train, score_fn, reference, critic=critic, eval_prompts=data.eval,
                    ptx=ptx)


SPECS = {"ppo": StageSpec(PPOSection, data_formats=("prompt",), build=build_stage)}
