"""The grpo stage: critic-free RL on rewards computed by programs (GRPO, Shao et al. 2024, DeepSeekMath; and
its variants Dr. GRPO, DAPO, GSPO, CISPO, RLOO). Experience comes from stages/rollout.py, the rewards from
minirlhf/rewards.py (Python functions named in the config) and optionally a reward model, the advantages
and the loss from losses/grpo.py; docs/grpo.md has the formulas, the papers and the knobs.

One trainer step is one rollout and num_iterations passes over it:

    prompts_per_rollout prompts --generate samples_per_prompt answers each--> B = prompts * G sequences
    reward functions (+ reward model) on the decoded answers   -> rewards [B, F]      (rewards.score_completions)
    [dynamic_sampling: drop groups whose rewards are all equal, generate more, max_extra_rollouts times]
    group-relative (or leave-one-out) advantages, one per answer -> [B]            (losses.grpo_advantages)
    num_iterations x (minibatch_size sequences per optimizer update (0 = the whole rollout);
                      micro_batch_size sequences per forward/backward)  clipped loss (losses.grpo_policy_loss)

Pay for what the settings use: with beta = 0 there is no reference model at all; when each pass is one
update (minibatch_size 0 or the rollout), the log-probs of the first pass's own forwards, detached, are
the old log-probs (ratio 1 on the first pass, the recorded values on the next ones), so no extra forward
runs; only several updates per pass need the old log-probs measured up front, by rollout.make_rollout.

Rows are prompt-major (the G answers of a prompt are adjacent). Under torchrun every rank samples its own
prompts; advantages and reward statistics are computed over all ranks' rewards (gathered), as TRL does.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minirlhf.batching import BatchIterator, collate_prompts
from minirlhf.build import DTYPES, apply_lora, build_model, build_tokenizer, disable_dropout, load_scalar_model
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.distributed import all_mean, gather_cat
from minirlhf.heads import RewardModel
from minirlhf.losses import (
    ADVANTAGE_ESTIMATORS,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    REWARD_AGGREGATIONS,
    SCALE_REWARDS,
    grpo_advantages,
    grpo_policy_loss,
    informative_groups,
    nan_std,
    weighted_reward_sum,
)
from minirlhf.losses.grpo import MICRO_BATCH_MEAN_LOSS_TYPES
from minirlhf.model import Transformer
from minirlhf.rewards import (
    RewardError,
    RewardFunction,
    as_reward_function,
    check_data_fields,
    load_reward_function,
    score_completions,
)
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import PolicyStage, Reference, build_reference, non_finite_error, non_finite_sampling
from minirlhf.stages.rollout import (
    RewardModelScorer,
    Rollout,
    append_samples,
    concat_rollouts,
    decode_rollout,
    greedy_rollouts,
    make_rollout,
    non_finite_parts,
    response_logprobs,
    sync_time,
)
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import PY_SPEC, ConfigError, check, check_choice, setting, toml_value
from minirlhf.trainer import StepResult, Trainer

logger = logging.getLogger(__name__)

@dataclass
class GRPOSection(StageSection):
    section = "grpo"
    reward_functions: list[str] = setting([], "reward functions, \"package.module:fn\" or \"file.py:fn\" (relative "
                                              "to the config file), e.g. [\"minirlhf.rewards:number_match\"]",
                                          path=PY_SPEC)
    reward_weights: list[float] = setting([], "one weight per reward source (the functions, then reward_model); "
                                              "[] = all 1")
    reward_kwargs: dict[str, dict] = setting({}, "constants bound to a function's parameters, keyed by its name (or "
                                                 "full spec): {format_match = {pattern = \"...\"}}")
    reward_model: str = setting("", "reward model directory (output of the rm stage): one more reward source, "
                                    "after the functions; empty = none", path=True)
    ref_model: str = setting("", "reference policy of the KL term (beta > 0); empty = the starting model (the "
                                 "policy with its adapters off under LoRA)", path=True)
    prompts_per_rollout: int = setting(8, "prompts sampled per rollout (per rank)")
    samples_per_prompt: int = setting(8, "completions per prompt, the group G (TRL: num_generations); >= 2")
    minibatch_size: int = setting(0, "rollout sequences per optimizer update; 0 = the whole rollout (one update "
                                     "per pass, on-policy: no extra forward)")
    micro_batch_size: int = setting(8, "sequences per forward/backward ([train] micro_batch_size is not used)")
    num_iterations: int = setting(1, "passes over each rollout, mu (GRPO's inner iterations)")
    loss_type: str = setting("dapo", "grpo | bnpo | dapo | dr_grpo | cispo (docs/grpo.md)")
    epsilon: float = setting(0.2, "lower clip range of the ratio, epsilon_low")
    epsilon_high: float = setting(0.0, "upper clip range (DAPO clip-higher; cispo: the weight cap is 1 + "
                                       "epsilon_high); 0 = epsilon")
    delta: float = setting(0.0, "cap of the unclipped ratio (INTELLECT-2 two-sided clipping), > 1; 0 = off")
    importance_sampling_level: str = setting("token", "token | sequence (GSPO)")
    beta: float = setting(0.0, "k3 KL penalty to the reference; 0 = no reference model at all")
    scale_rewards: str = setting("group", "divide advantages by the std of the group | batch | none (Dr. GRPO)")
    estimator: str = setting("grpo", "advantages: grpo (group mean-centred) | rloo (leave-one-out; scale_rewards "
                                     "none or batch)")
    multi_objective_aggregation: str = setting("sum_then_normalize", "several rewards: sum_then_normalize | "
                                                                     "normalize_then_sum (GDPO)")
    mask_truncated_completions: bool = setting(False, "leave answers cut at max_new_tokens out of the loss (DAPO)")
    dynamic_sampling: bool = setting(False, "drop groups whose rewards are all equal and generate more (DAPO)")
    max_extra_rollouts: int = setting(4, "dynamic_sampling: extra generation rounds per step at most; groups still "
                                         "missing then are filled with dropped ones")
    max_new_tokens: int = setting(256, "longest generated answer (TRL: max_completion_length)")
    temperature: float = setting(1.0, "sampling temperature of rollouts (and of the log-probs)")
    top_k: int = setting(0, "sample from the k most likely tokens; 0 = off")
    top_p: float = setting(1.0, "nucleus sampling mass; 1 = off")
    log_samples_every: int = setting(10, "rollouts between logged sample generations; 0 = never")

    def validate(self) -> None:
        s = self.section
        for key in ("prompts_per_rollout", "micro_batch_size", "num_iterations", "max_new_tokens"):
            check(getattr(self, key) >= 1, s, key, ">= 1", getattr(self, key))
        for key in ("minibatch_size", "max_extra_rollouts", "top_k", "log_samples_every", "beta", "epsilon_high"):
            check(getattr(self, key) >= 0, s, key, ">= 0", getattr(self, key))
        check(self.samples_per_prompt >= 2, s, "samples_per_prompt",
              ">= 2 (advantages compare the answers to one prompt)", self.samples_per_prompt)
        check_choice(s, "loss_type", self.loss_type, GRPO_LOSS_TYPES)
        check_choice(s, "estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        check_choice(s, "scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice(s, "multi_objective_aggregation", self.multi_objective_aggregation, REWARD_AGGREGATIONS)
        check_choice(s, "importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check(0.0 <= self.epsilon < 1.0, s, "epsilon", "in [0, 1)", self.epsilon)
        check(self.delta == 0 or self.delta > 1, s, "delta", "0 (off) or > 1", self.delta)
        check(self.temperature > 0, s, "temperature", "> 0 (rollout log-probs need a proper distribution)",
              self.temperature)
        check(0.0 < self.top_p <= 1.0, s, "top_p", "in (0, 1]", self.top_p)
        if self.delta and self.loss_type == "cispo":
            raise ConfigError(f"[{s}] delta must be 0 with loss_type = \"cispo\" (it caps the ratio of the clipped "
                              f"losses; cispo caps its weight at 1 + epsilon_high), got {toml_value(self.delta)}",
                              s, "delta")
        if self.estimator == "rloo" and self.scale_rewards == "group":
            raise ConfigError(f"[{s}] scale_rewards must be \"none\" or \"batch\" with estimator = \"rloo\" (dividing "
                              f"by the group's std is GRPO's), got \"group\"", s, "scale_rewards")
        if self.multi_objective_aggregation == "normalize_then_sum" and (
                self.estimator != "grpo" or self.scale_rewards != "group"):
            raise ConfigError(f"[{s}] multi_objective_aggregation = \"normalize_then_sum\" divides each reward by its "
                              f"group's std: it needs estimator = \"grpo\" and scale_rewards = \"group\", got "
                              f"{toml_value(self.estimator)} and {toml_value(self.scale_rewards)}", s,
                              "multi_objective_aggregation")
        self._validate_sources()
        self._validate_batches()

    def _validate_sources(self) -> None:
        s = self.section
        n_sources = len(self.reward_functions) + bool(self.reward_model)
        if self.reward_weights and len(self.reward_weights) != n_sources:
            raise ConfigError(f"[{s}] reward_weights must have one weight per reward source ({n_sources}: "
                              f"{len(self.reward_functions)} reward_functions"
                              f"{' + reward_model' if self.reward_model else ''}) or be [], got "
                              f"{len(self.reward_weights)}", s, "reward_weights")
        for key in self.reward_kwargs:
            matches = [f for f in self.reward_functions if key in (f, f.rpartition(":")[2])]
            if not matches:
                listed = ", ".join(map(toml_value, self.reward_functions)) or "none"
                raise ConfigError(f"[{s}] reward_kwargs names {toml_value(key)}, which is not in reward_functions "
                                  f"({listed})", s, "reward_kwargs")
            if len(matches) > 1 and key not in self.reward_functions:
                raise ConfigError(f"[{s}] reward_kwargs {toml_value(key)} names {len(matches)} reward_functions; "
                                  f"key it by the full spec", s, "reward_kwargs")

    def kwargs_for(self, spec: str) -> dict | None:
        """The reward_kwargs of a listed function: by its full spec, else by its name (the part after ':')."""
        return self.reward_kwargs.get(spec, self.reward_kwargs.get(spec.rpartition(":")[2]))

    def _validate_batches(self) -> None:
        s = self.section
        rollout = self.prompts_per_rollout * self.samples_per_prompt
        minibatch = self.minibatch_size or rollout
        if rollout % minibatch:
            raise ConfigError(f"[{s}] minibatch_size must divide prompts_per_rollout * samples_per_prompt = "
                              f"{self.prompts_per_rollout} * {self.samples_per_prompt} = {rollout}, got "
                              f"{self.minibatch_size}", s, "minibatch_size")
        if minibatch % self.micro_batch_size:
            what = f"minibatch_size = {minibatch}" if self.minibatch_size else f"the rollout's {rollout} sequences"
            raise ConfigError(f"[{s}] micro_batch_size must divide {what}, got {self.micro_batch_size}", s,
                              "micro_batch_size")

    def validate_run(self, cfg: Config) -> None:
        if not self.reward_functions and not self.reward_model:
            raise ConfigError("[grpo] reward_functions must name at least one function (or set reward_model) for "
                              "stage grpo, got []", "grpo", "reward_functions")
        load_reward_functions(self)  # a function that cannot be loaded stops here, before any compute

    def longest_row(self, cfg: Config) -> tuple[int, str, str]:
        return cfg.data.cutoff_len + self.max_new_tokens, "grpo", "max_new_tokens"


def load_reward_functions(section: GRPOSection) -> list[RewardFunction]:
    """The [grpo] reward_functions, with their reward_kwargs bound; a function that cannot be loaded is a
    ConfigError naming the key and the function."""
    try:
        return [load_reward_function(spec, kwargs=section.kwargs_for(spec)) for spec in section.reward_functions]
    except RewardError as e:
        raise ConfigError(f"[grpo] reward_functions: {e}", "grpo", "reward_functions") from None


def source_names(functions: list[RewardFunction], has_reward_model: bool) -> list[str]:
    """Metric names of the reward sources, as TRL names them: a function's own name ("number_match"), then
    "reward_model"; a repeated name gets its position appended."""
    names = [f.name.rpartition(":")[2].rpartition(".")[2] for f in functions]
    names += ["reward_model"] if has_reward_model else []
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


# --------------------------------------------------------------------------------------------------
# the stage


class GRPOStage(PolicyStage):
    """Rollouts, rewards, group advantages and the clipped loss for one trainer step.

    model:             the policy being trained (LoRA adapters injected or not)
    reward_functions:  rewards.RewardFunction (or plain callables, the Python API), TRL's convention
    reward_model:      a frozen reward model, one more reward source after the functions, or None
    reference:         the reference of the KL term when beta > 0 (stages/common.py), else None
    prompts:           encoded prompts of data.encode_prompt ({"input_ids", "prompt", "fields"}),
                       eval_prompts likewise (greedy answers scored at the end / eval_every)
    """

    def __init__(self, cfg: Config, policy: Transformer, tok: Tokenizer, prompts: list[dict],
                 reward_functions: list, reward_model: RewardModel | None = None,
                 reference: Reference | None = None, eval_prompts: list[dict] | None = None):
        p = cfg.grpo
        if len(prompts) < p.prompts_per_rollout:
            raise ConfigError(f"[grpo] prompts_per_rollout must be <= the {len(prompts)} training prompts, got "
                              f"{p.prompts_per_rollout}", "grpo", "prompts_per_rollout")
        if p.beta > 0 and reference is None:
            raise ValueError("GRPOStage: beta > 0 needs a reference")
        functions = [as_reward_function(f) for f in reward_functions]
        if not functions and reward_model is None:
            raise ValueError("GRPOStage: no reward source (reward functions or a reward model)")
        self.cfg, self.tok, self.model = cfg, tok, policy
        self.reward_functions = functions
        self.scorer = RewardModelScorer(reward_model, p.micro_batch_size) if reward_model is not None else None
        self.reference = reference if p.beta > 0 else None
        self.names = source_names(functions, reward_model is not None)
        self.weights = list(p.reward_weights) or None
        collate = functools.partial(collate_prompts, pad_id=tok.pad_id)
        self.batches = BatchIterator(prompts, p.prompts_per_rollout, collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle, drop_last=True)
        self.eval_prompts = eval_prompts or []
        self.stop_ids = list(tok.stop_ids)
        self.num_tokens = 0  # tokens of every rollout so far, all ranks (TRL's num_tokens)

    @property
    def updates_per_pass(self) -> int:
        p = self.cfg.grpo
        rollout = p.prompts_per_rollout * p.samples_per_prompt
        return rollout // (p.minibatch_size or rollout)

    def frozen_modules(self) -> list[nn.Module]:
        """The frozen reference copy (beta > 0 and no LoRA) and the reward model."""
        out = self.reference.frozen_modules() if self.reference is not None else []
        return out + ([self.scorer.reward_model] if self.scorer is not None else [])

    def steps_per_epoch(self) -> int:
        """One rollout per trainer step: a pass over the prompts is this many steps."""
        return self.batches.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_tokens = int(state["num_tokens"])

    # -- experience ----------------------------------------------------------------------------

    def score(self, rollout: Rollout, prompts: list, fields: dict[str, list], where: str) -> torch.Tensor:
        """Every reward source on a rollout of len(prompts) prompts x G answers: [B, F] float32 on the rollout's
        device, NaN where a function returned None. The functions get the prompts as their rows give them, the
        decoded answers, each row's other columns and the answers' token counts (rewards.STAGE_FIELDS)."""
        G = rollout.size // len(prompts)
        _, completions = decode_rollout(self.tok, rollout)
        columns = []
        if self.reward_functions:
            row_fields = {k: [v for v in values for _ in range(G)] for k, values in fields.items()}
            row_fields["completion_lengths"] = rollout.response_mask.sum(-1).tolist()
            rows = [f"{where}, prompt {i // G + 1} answer {i % G + 1}" for i in range(rollout.size)]
            try:
                columns.append(score_completions(self.reward_functions, [q for q in prompts for _ in range(G)],
                                                 completions, row_fields, rows))
            except RewardError as e:
                if where in str(e):
                    raise
                raise RewardError(f"{e} ({where})") from None  # a wrong length names no single row
        if self.scorer is not None:
            columns.append(self.scorer(rollout).float().cpu()[:, None])
        return torch.cat(columns, dim=1).to(rollout.input_ids.device)

    def sample(self, trainer: Trainer, where: str) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """One generation round on the next prompt batch: the rollout (old log-probs measured only when an
        update is not the whole pass; reference log-probs when beta > 0), its rewards [B, F], and timings.
        A NaN or inf among the measured log-probs or the reward model's scores stops the run, as in ppo
        (common.non_finite_error); only a reward function's None reads as "no reward"."""
        p = self.cfg.grpo
        prompts = trainer.to_device(next(self.batches))
        start = time.perf_counter()
        with non_finite_sampling(trainer):
            rollout, generating = make_rollout(
                self.model, prompts, samples_per_prompt=p.samples_per_prompt, max_new_tokens=p.max_new_tokens,
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, stop_ids=self.stop_ids,
                pad_id=self.tok.pad_id, micro_batch_size=p.micro_batch_size, reference=self.reference,
                autocast=trainer.autocast, dist=trainer.dist, measure_policy=self.updates_per_pass > 1)
        measured = sync_time(rollout.input_ids)
        with trainer.autocast():
            rewards = self.score(rollout, prompts["prompts"], prompts["fields"], where)
        timings = {"time/generate": generating, "time/logprobs": measured - start - generating,
                   "time/score": time.perf_counter() - measured}
        if self.scorer is not None:  # the scorer's output as it came: a NaN in it is a broken model, not a None
            rollout.raw_scores = rewards[:, -1]
        bad = non_finite_parts(rollout)
        if all_mean(float(bool(bad))) > 0:  # every rank stops, not only the one that saw it
            raise non_finite_error(trainer, " and ".join(bad) or "values on another rank")
        return rollout, rewards, timings

    def experience(self, trainer: Trainer) -> tuple[Rollout, torch.Tensor, list[tuple[Rollout, torch.Tensor]],
                                                     dict[str, float]]:
        """The rollout to train on and its rewards [B, F], every round generated this step (for the metrics),
        and timings. With dynamic_sampling (DAPO, Yu et al. 2025, sec. 3.2), groups whose rewards are all equal
        (losses.informative_groups) are set aside and more prompts are drawn, up to max_extra_rollouts more
        rounds (all ranks draw as long as one still lacks groups); the batch is then the informative groups in
        the order drawn, filled up with set-aside ones when there are too few."""
        p = self.cfg.grpo
        G, wanted = p.samples_per_prompt, p.prompts_per_rollout
        where = f"step {trainer.step + 1}"
        rounds, timings = [], {}
        kept: list[tuple[int, int]] = []  # (round, group) of informative groups, in the order drawn
        spare: list[tuple[int, int]] = []
        while True:
            rollout, rewards, took = self.sample(trainer, where if not rounds else f"{where} round {len(rounds) + 1}")
            timings = {k: timings.get(k, 0.0) + v for k, v in took.items()}
            rounds.append((rollout, rewards))
            if not p.dynamic_sampling:
                return rollout, rewards, rounds, timings
            informative = informative_groups(weighted_reward_sum(rewards, self.weights).view(-1, G)).tolist()
            r = len(rounds) - 1
            kept += [(r, g) for g, ok in enumerate(informative) if ok]
            spare += [(r, g) for g, ok in enumerate(informative) if not ok]
            short = float(len(kept) < wanted)
            if all_mean(short) == 0 or len(rounds) > p.max_extra_rollouts:  # the ranks agree on the rounds
                break
        chosen = kept[:wanted] + spare[: wanted - min(len(kept), wanted)]
        parts, part_rewards = [], []
        for r, (rollout, rewards) in enumerate(rounds):
            groups = torch.tensor([g for rr, g in chosen if rr == r], dtype=torch.long)
            if len(groups):
                rows = (groups[:, None] * G + torch.arange(G)).reshape(-1).to(rollout.input_ids.device)
                parts.append(rollout.select(rows))
                part_rewards.append(rewards[rows])
        timings["dynamic_sampling/extra_rollouts"] = float(len(rounds) - 1)
        timings["dynamic_sampling/filled_groups"] = float(max(wanted - len(kept), 0))
        return concat_rollouts(parts, self.tok.pad_id), torch.cat(part_rewards), rounds, timings

    def group_advantages(self, rewards: torch.Tensor, trainer: Trainer) -> torch.Tensor:
        """[B, F] rewards of this rank -> [B] advantages, computed on every rank's rewards (a batch std or
        GDPO's batch normalisation spans them all) and this rank's rows taken back."""
        p = self.cfg.grpo
        everything = gather_cat(rewards)  # [W * B, F]
        advantages = grpo_advantages(everything, p.samples_per_prompt, self.weights, estimator=p.estimator,
                                     aggregation=p.multi_objective_aggregation, scale_rewards=p.scale_rewards)
        rank = trainer.dist.rank if trainer.dist is not None else 0
        return advantages[rank * rewards.shape[0]: (rank + 1) * rewards.shape[0]]

    # -- the update ----------------------------------------------------------------------------

    def micro_batch_loss(self, batch: Rollout, num_items: float, n_micro: int,
                         with_entropy: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor,
                                                      torch.Tensor | None]:
        """The clipped loss of one micro-batch (a Rollout slice), scaled for accumulation over the n_micro
        micro-batches of its minibatch. Returns (loss, detached diagnostics, its detached log-probs [b, N],
        the policy's entropy [b, N] or None). Without recorded old log-probs the update is on-policy: the
        old log-probs are this forward's own, detached (ratio 1)."""
        p = self.cfg.grpo
        logprobs, entropy = response_logprobs(self.model, batch.input_ids, batch.attention_mask, batch.response_mask,
                                              batch.prompt_len, p.temperature, with_entropy=with_entropy)
        old = batch.logprobs if batch.logprobs is not None else logprobs.detach()
        mask = self.loss_mask(batch.response_mask, batch.has_stop)
        loss, stats = grpo_policy_loss(
            logprobs, old, batch.advantages, mask, loss_type=p.loss_type, epsilon_low=p.epsilon,
            epsilon_high=p.epsilon_high or None, importance_sampling_level=p.importance_sampling_level,
            delta=p.delta or None, beta=p.beta, ref_logprobs=batch.ref_logprobs, num_items_in_batch=num_items,
            max_completion_length=p.max_new_tokens)
        if p.loss_type in MICRO_BATCH_MEAN_LOSS_TYPES:
            loss = loss / n_micro
        return loss, stats, logprobs.detach(), entropy

    def loss_mask(self, response_mask: torch.Tensor, has_stop: torch.Tensor) -> torch.Tensor:
        """The tokens the loss reads, [b, N] bool: the answer tokens, less the answers cut at max_new_tokens when
        mask_truncated_completions is on (DAPO sec. 3.4)."""
        if self.cfg.grpo.mask_truncated_completions:
            return response_mask & has_stop[:, None]
        return response_mask

    def minibatch_tokens(self, rollout: Rollout, rows: torch.Tensor, trainer: Trainer) -> float:
        """The loss tokens of a minibatch summed over ranks and divided by their number: dapo's and cispo's
        normaliser (gradients are averaged over ranks). Not Stage.loss_tokens, which weights the default
        train_step's micro-batches."""
        mask = self.loss_mask(rollout.response_mask[rows], rollout.has_stop[rows])
        tokens = float(mask.sum())
        if trainer.dist is None:
            return tokens
        return trainer.dist.sum(tokens) / trainer.dist.world_size

    def update(self, rollout: Rollout, trainer: Trainer) -> dict[str, float]:
        """num_iterations passes over the rollout, one optimizer update per minibatch. When one update is the
        whole pass, the first pass runs on-policy and its log-probs become the old ones of the next passes."""
        p = self.cfg.grpo
        n, device = rollout.size, rollout.input_ids.device
        size = p.minibatch_size or n
        n_micro = size // p.micro_batch_size
        record = rollout.logprobs is None and p.num_iterations > 1
        recorded = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=device) if record else None
        # float64 device accumulators, read once at the end rather than a float() per metric and micro-batch
        # (Rollout.select still reads each micro-batch's width on the host)
        sums: dict[str, torch.Tensor] = {}
        zero = torch.zeros((), dtype=torch.float64, device=device)
        entropy_sum, entropy_tokens, updates = zero, zero, 0
        minibatches = [torch.arange(start, start + size, device=device) for start in range(0, n, size)]
        num_items = [self.minibatch_tokens(rollout, rows, trainer) for rows in minibatches]  # the same every pass
        for iteration in range(p.num_iterations):
            for rows, tokens in zip(minibatches, num_items):
                for micro in rows.split(p.micro_batch_size):
                    batch = rollout.select(micro)
                    with trainer.autocast():
                        loss, stats, logprobs, entropy = self.micro_batch_loss(batch, tokens, n_micro,
                                                                               with_entropy=iteration == 0)
                    trainer.backward(loss, stats)
                    if recorded is not None:
                        recorded[micro, : logprobs.shape[1]] = logprobs.float()
                    if entropy is not None:
                        entropy_sum = entropy_sum + (entropy * batch.response_mask).sum().double()
                        entropy_tokens = entropy_tokens + batch.response_mask.sum().double()
                    for k, v in {"loss": loss.detach(), **{k: v / n_micro for k, v in stats.items()}}.items():
                        sums[k] = sums.get(k, zero) + v.double()
                grad = trainer.optimizer_step()
                sums["grad_norm"] = sums.get("grad_norm", zero) + grad["grad_norm"]
                updates += 1
            if recorded is not None and iteration == 0:
                rollout.logprobs = recorded
        sums = {k: float(v) for k, v in sums.items()}
        out = {"loss": sums["loss"] / updates, "grad_norm": sums["grad_norm"] / updates,
               "clip_ratio/low_mean": sums["clip_low"] / updates, "clip_ratio/high_mean": sums["clip_high"] / updates,
               "clip_ratio/region_mean": sums["clip_region"] / updates, "updates": float(updates),
               "entropy": float(entropy_sum) / max(float(entropy_tokens), 1.0)}
        if "kl" in sums:
            out["kl"] = sums["kl"] / updates
        return out

    # -- one trainer step ----------------------------------------------------------------------

    def reward_metrics(self, rewards: torch.Tensor) -> dict[str, float]:
        """TRL's reward metrics over rewards [N, F] (every rank's): reward (the weighted sum), reward_std (the
        mean of the groups' stds), frac_reward_zero_std, and rewards/<source>/mean and /std."""
        G = self.cfg.grpo.samples_per_prompt
        total = weighted_reward_sum(rewards, self.weights)  # [N]
        groups = total.view(-1, G)
        out = {"reward": float(torch.nanmean(total)), "reward_std": float(torch.nanmean(nan_std(groups, dim=1))),
               "frac_reward_zero_std": float((~informative_groups(groups)).float().mean())}
        for name, column in zip(self.names, rewards.T):
            out[f"rewards/{name}/mean"] = float(torch.nanmean(column))
            out[f"rewards/{name}/std"] = float(nan_std(column))
        return {k: (v if v == v else 0.0) for k, v in out.items()}  # NaN (nothing scored) logs as 0

    @staticmethod
    def completion_metrics(lengths: torch.Tensor, has_stop: torch.Tensor) -> dict[str, float]:
        """TRL's completions/... metrics from answer lengths [N] and whether each answer stopped [N]."""
        lengths, has_stop = lengths.float(), has_stop.bool()
        stopped = lengths[has_stop]
        return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float((~has_stop).float().mean()),
                "completions/mean_terminated_length": float(stopped.mean()) if len(stopped) else 0.0}

    def train_step(self, trainer: Trainer) -> StepResult:
        rollout, rewards, rounds, timings = self.experience(trainer)
        rollout.advantages = self.group_advantages(rewards, trainer)
        start = time.perf_counter()
        train_metrics = self.update(rollout, trainer)
        timings["time/train"] = sync_time(rollout.input_ids) - start

        drawn = gather_cat(torch.cat([r for _, r in rounds]))  # every answer generated this step, all ranks
        lengths = gather_cat(torch.cat([ro.response_mask.sum(-1) for ro, _ in rounds]))
        has_stop = gather_cat(torch.cat([ro.has_stop for ro, _ in rounds]))
        tokens = int(rollout.attention_mask.sum())
        self.num_tokens += int(trainer.dist.sum(tokens)) if trainer.dist is not None else tokens
        metrics = {**self.reward_metrics(drawn), **self.completion_metrics(lengths, has_stop), **train_metrics,
                   **timings, "num_tokens": float(self.num_tokens)}
        every = self.cfg.grpo.log_samples_every
        if every and (trainer.step + 1) % every == 0 and trainer.is_main:
            rollout.raw_scores = rollout.scores = weighted_reward_sum(rewards, self.weights)
            samples = Path(self.cfg.train.output_dir) / "samples.jsonl"
            with trainer.writing(samples):
                append_samples(samples, self.tok, rollout, trainer.step + 1)
        return StepResult(metrics, tokens)

    # -- eval ----------------------------------------------------------------------------------

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Greedy answers to the eval prompts scored by the reward sources (greedy, so the RNG stream is
        untouched): reward, rewards/<source>/mean (a 0/1 function's accuracy), answer lengths."""
        if not self.eval_prompts:
            return {}
        p = self.cfg.grpo
        rewards, lengths, has_stop = [], [], []
        for i, (rows, rollout) in enumerate(greedy_rollouts(self.model, self.eval_prompts, p.prompts_per_rollout,
                                                            p.max_new_tokens, self.stop_ids, self.tok.pad_id,
                                                            trainer.to_device, trainer.dist)):
            rewards.append(self.score(rollout, rows["prompts"], rows["fields"], f"eval batch {i + 1}").cpu())
            lengths.append(rollout.response_mask.sum(-1).cpu())
            has_stop.append(rollout.has_stop.cpu())
        rewards = torch.cat(rewards)
        total = weighted_reward_sum(rewards, self.weights)
        out = {"reward": float(torch.nanmean(total))}
        out.update({f"rewards/{name}/mean": float(torch.nanmean(col)) for name, col in zip(self.names, rewards.T)})
        lengths, has_stop = torch.cat(lengths).float(), torch.cat(has_stop)
        out.update({"completions/mean_length": float(lengths.mean()),
                    "completions/clipped_ratio": float((~has_stop).float().mean())})
        return out


# --------------------------------------------------------------------------------------------------
# from a config


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> GRPOStage:
    """Reward functions, tokenizer and prompts first (their errors come before any model is loaded), the data
    rows checked against the fields the functions need, then the policy ([model] path + [lora]), the
    reference only when beta > 0, and the frozen reward model when [grpo] reward_model is set."""
    p = cfg.grpo
    functions = load_reward_functions(p)
    tok = build_tokenizer(cfg)
    data = build_datasets(cfg, tok, SPECS["grpo"].data_formats)
    check_data_fields(functions, data.train, "training")
    check_data_fields(functions, data.eval, "eval")
    policy = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device)))
    reference = build_reference(cfg, tok, policy, p.ref_model, "grpo", device) if p.beta > 0 else None
    reward_model = None
    if p.reward_model:
        reward_model = load_scalar_model(cfg, tok, p.reward_model, "grpo", "reward_model", DTYPES[cfg.model.dtype],
                                         device)
        reward_model.requires_grad_(False)
        reward_model.eval()
    return GRPOStage(cfg, policy, tok, data.train, functions, reward_model, reference, data.eval)


SPECS = {"grpo": StageSpec(GRPOSection, data_formats=("prompt",), build=build_stage)}
