"""The one training loop every stage shares, and the contract between it and a stage.

A stage (minirlhf/stages) says what a batch's loss is; the trainer does the rest: AdamW with warmup and
decay, gradient accumulation, clipping, precision, evaluation, logging (run_log.py), atomic checkpoints
with exact resume (checkpointing.py), Ctrl-C (interrupts.py), and stopping on a non-finite or diverged
loss. Under torchrun it shards the stage through distributed.py, which sees only what `Stage` declares.

    step = one trainer step = grad_accum micro-batches and one update (ppo: one rollout and its updates)

The step counter, data position, RNG and weights of a checkpoint always belong together: a Ctrl-C that
arrives while the weights are being updated is held back until the step is complete.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
from safetensors import SafetensorError
from tqdm import tqdm

from minirlhf import distributed
from minirlhf.checkpointing import (
    STATE_FORMAT,
    load_checkpoint,
    partial_path,
    resume_path,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    trainable_names,
)
from minirlhf.errors import TrainingError
from minirlhf.interrupts import DeferredInterrupt
from minirlhf.model import Transformer
from minirlhf.optimization import adamw, decay_groups, lr_schedule
from minirlhf.run_dir import OutputDir, OutputDirError, claim_output_dir
from minirlhf.run_log import MetricsLog, plot_metrics

if TYPE_CHECKING:
    from minirlhf.config import Config
    from minirlhf.distributed import DistContext

logger = logging.getLogger(__name__)

__all__ = ["Batches", "Stage", "StepResult", "Trainer", "TrainingError", "autocast_for", "has_diverged"]

DIVERGENCE_PATIENCE = 3  # consecutive logged losses


@dataclass
class StepResult:
    """What one trainer step reports: scalar metrics and the number of tokens it trained on."""

    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


# --------------------------------------------------------------------------------------------------
# the contract


class Batches(Protocol):
    """A resumable, shardable iterator of micro-batches (batching.BatchIterator is the one minirlhf has)."""

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank reads per pass over its data."""

    def __next__(self) -> Any:
        """The next batch (it never ends; a new epoch reshuffles)."""

    def state_dict(self) -> dict[str, Any]:
        """The position in the data, for a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def shard(self, rank: int, world_size: int) -> None:
        """Read only this rank's share from now on (under torchrun)."""


class Stage:
    """What a stage is to the trainer, and through it to `distributed`: nothing else of a stage is read.

    cfg       the run's Config
    model     the module that owns every trainable parameter (the policy, a value head, adapters ...);
              the trainer optimises and checkpoints its trainable parameters
    batches   the training micro-batches (ppo: prompt batches), whose position a checkpoint keeps

    What the stage runs besides `model`: `iterators()` (every Batches it reads, sharded by rank under
    torchrun) and `frozen_modules()` (models it runs without training them, sharded too). Its forwards
    of frozen models go through distributed.frozen_forwards, generation through distributed.gathered:
    no stage calls FSDP itself.

    One step: `train_step` (by default: grad_accum micro-batches through `loss`, weighted by
    `loss_tokens`, then one `trainer.optimizer_step()`); the trainer alone advances the lr schedule, once
    per step, whatever the number of updates. The metrics a step returns are averaged over ranks, then
    `reduce_metrics` turns them into the logged ones (kto's per-class means).
    At the end: `evaluate` (also every [train] eval_every steps), then `save_final(out_dir, model)` with the
    trained model (under torchrun an unsharded CPU copy of it). `state_dict` / `load_state_dict`: what
    else a resume needs (ppo's KL controller).
    """

    cfg: Config
    model: nn.Module
    batches: Batches

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss of one micro-batch and detached metrics (each a scalar tensor)."""
        raise NotImplementedError

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int | None:
        """How many tokens the mean that `loss` returns is taken over (pt/sft: the trained labels), read
        on the host before the batch moves to the device. The trainer weights each micro-batch's mean by
        it, so that a step's gradient is the mean over every trained token of the accumulated batch (and
        of all ranks). None (the default): the loss is a mean over sequences or pairs (rm, dpo, kto) and
        every micro-batch counts the same."""
        return None

    def train_step(self, trainer: Trainer) -> StepResult:
        """One trainer step: accumulate grad_accum micro-batches, then update. ppo overrides this."""
        batches = [next(self.batches) for _ in range(trainer.cfg.train.grad_accum)]  # on the host
        weights = trainer.micro_batch_weights([self.loss_tokens(b) for b in batches])
        totals: dict[str, torch.Tensor] = {}  # summed on the device, read once per step
        tokens = 0
        for batch, weight in zip(batches, weights):
            tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))  # on the host
            batch = trainer.to_device(batch)
            with trainer.autocast():
                loss, metrics = self.loss(batch)
            trainer.backward(loss * weight, metrics)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * weight
        metrics = {k: float(v) for k, v in totals.items()}  # the trainer's mean over ranks completes the mean
        metrics.update(trainer.optimizer_step())
        return StepResult(metrics, tokens)

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The logged metrics of a step from what train_step returned, after the mean over ranks (each value
        summed over the step's micro-batches with their weights). The default logs them as they are; a
        stage whose metrics are ratios returns numerators and denominators and divides them here."""
        return metrics

    def chance_loss(self) -> float | None:
        """The training loss of a model that has learned nothing (pt/sft: ln V, a uniform guess over the
        vocabulary), by which the trainer recognises a diverged run (`has_diverged`); None = unchecked."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped for AdamW (see `decay_groups`)."""
        return decay_groups(self.model)

    def steps_per_epoch(self) -> int:
        """Trainer steps in one pass over the data (ppo: over the prompts, one rollout a step)."""
        return math.ceil(self.batches.batches_per_epoch / self.cfg.train.grad_accum)

    def iterators(self) -> list[Batches]:
        """Every iterator of batches the stage reads (ppo adds its pretraining batches)."""
        return [self.batches]

    def frozen_modules(self) -> list[nn.Module]:
        """Models the stage runs but does not train and that are not inside `model` (a frozen reference
        copy, a reward model); none by default."""
        return []

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Metrics on the eval data (prefixed "eval/" by the trainer); none by default."""
        return {}

    def save_final(self, out_dir: Path, model: nn.Module) -> None:
        """Write the trained `model` (this stage's `model`, or under torchrun an unsharded CPU copy of it)
        into out_dir: an HF-format directory, or the adapter."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Stage state beyond weights, optimizer and data that a resume needs (e.g. ppo's KL coef)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# precision, divergence


def autocast_for(precision: str, device: torch.device | str) -> AbstractContextManager:
    """bf16 autocast on GPU (or when asked for with precision = "bf16"), plain float32 otherwise.
    Passes outside the loop (dpo's reference precompute, ppo's rollout) use it to match training."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def has_diverged(losses: list[float], chance: float, patience: int = DIVERGENCE_PATIENCE) -> bool:
    """Whether the last `patience` logged training losses say the run has diverged: all of them at or
    above the chance level (within 1%; a language model's is ln V, the loss of a uniform guess) after the
    run had once been clearly below it (< 0.9 x chance), or all of them above twice the chance level.

    A model starting from scratch sits at the chance level until it learns, so that alone is no sign;
    coming back to it, or going far past it, is (e.g. lr = 1e4 pins the loss at ln V).
    """
    if len(losses) < patience:
        return False
    tail, before = losses[-patience:], losses[:-patience]
    if all(x > 2 * chance for x in tail):
        return True
    return any(x < 0.9 * chance for x in before) and all(x >= 0.99 * chance for x in tail)


def compile_blocks(model: nn.Module) -> None:
    """[train] compile: Transformer.compile_blocks on every decoder inside the trained model (the policy,
    ppo's critic, the rm backbone). Compiling happens in the first steps (tens of seconds on a CPU, counted
    in their time/step; Transformer.compile_blocks says when it compiles again)."""
    decoders = [m for m in model.modules() if isinstance(m, Transformer)]
    for decoder in decoders:
        decoder.compile_blocks()
    logger.info("[train] compile: %d decoder(s) run their blocks through torch.compile; the first steps include "
                "compiling", len(decoders))


# --------------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """Runs a Stage under a Config: `Trainer(cfg, stage).fit()`. It alone owns the optimizer and the lr
    schedule, the step counter, precision, logging, checkpoints and Ctrl-C."""

    def __init__(self, cfg: Config, stage: Stage, device: torch.device | str | None = None,
                 dist: DistContext | None = None, run_dir: OutputDir | None = None):
        """dist: the DistContext when run under torchrun, else None; the stage's model, frozen models and
        iterators are then sharded here (distributed.prepare), before the optimizer is built. run_dir: the
        output directory already claimed for this run (run_dir.claim_output_dir, as `minirlhf train` does
        before building the stage); fit() claims it when None and releases it when done."""
        self.cfg = cfg
        self.stage = stage
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.train.output_dir)
        self.run_dir = run_dir
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.interrupts = DeferredInterrupt()
        self.metrics_log = MetricsLog(self.out, enabled=self.is_main)
        self._boundary: dict[str, Any] | None = None
        # a meta-device copy of the unsharded model, for the final export (under torchrun)
        self.skeleton = (distributed.prepare(stage.model, stage.frozen_modules(), stage.iterators(), dist)
                         if dist is not None else None)
        if cfg.train.compile:
            compile_blocks(stage.model)
        # torch's fused AdamW on CUDA. On a CPU it would be faster too (0.16 against 0.58 s a step for the
        # 135M SmolLM2), but its last-bit differences moved the demo's kto run from KL 0.2 to 1.6 (seed 0):
        # that run is chaotic enough that the switch waits until the demo is re-measured with it
        fused = self.device.type == "cuda" and not (dist is not None and dist.cpu_offload)
        self.optimizer = adamw(stage.param_groups(), cfg.train, fused)
        # what this run's config says of each group; a resumed optimizer state keeps its moments, not these
        self._group_settings = [{k: g[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay")}
                                for g in self.optimizer.param_groups]
        self.total_steps = self._total_steps()
        self.scheduler = lr_schedule(self.optimizer, cfg.train, self.total_steps, 0)

    # -- the schedule ----------------------------------------------------------------------------

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return t.epochs * self.stage.steps_per_epoch()

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- pieces a stage's train_step uses ------------------------------------------------------

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def autocast(self):
        return autocast_for(self.cfg.train.precision, self.device)

    def micro_batch_weights(self, counts: list[int | None]) -> list[float]:
        """The factor of each micro-batch's mean loss in the step's gradient.

        counts: each micro-batch's `Stage.loss_tokens` n_i. With counts, w_i = n_i * W / N where N sums the
        n_i of every micro-batch of the step on all W ranks (FSDP averages gradients over ranks, so the
        update is the gradient of sum_i n_i * mean_i / N, the mean over all N trained tokens); without
        (None), w_i = 1 / grad_accum, every micro-batch's mean counting the same.
        """
        if any(c is None for c in counts):
            return [1.0 / len(counts)] * len(counts)
        total, world = float(sum(counts)), 1
        if self.dist is not None:  # every rank must reach this collective: all of them run train_step
            total, world = self.dist.sum(total), self.dist.world_size
        return [c * world / max(total, 1.0) for c in counts]

    def backward(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None) -> None:
        """Backpropagate, refusing a non-finite loss before it can reach the weights."""
        if not bool(torch.isfinite(loss)):
            shown = {k: round(float(v), 4) for k, v in (metrics or {}).items()}
            raise TrainingError(f"non-finite loss ({float(loss)}) at step {self.step + 1}; metrics {shown}; "
                                f"{self.last_good()}. Try a lower lr, fp32 precision, or check the data.")
        loss.backward()

    def optimizer_step(self) -> dict[str, float]:
        """Clip the gradient and update the weights; returns grad_norm. A stage may call it several times in
        one train_step (ppo: once per minibatch); the schedule advances once per trainer step, in `fit`.
        From the first update of a step to its end, Ctrl-C is held back (see `fit`)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
            norm = norm.full_tensor()
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite gradient norm at step {self.step + 1}; {self.last_good()}")
        self.interrupts.hold()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}

    # -- checkpoints ---------------------------------------------------------------------------

    def last_good(self) -> str:
        return f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was written yet"

    @contextmanager
    def writing(self, what: Path) -> Iterator[None]:
        """Turn a failed write (a read-only or full disk, a path that is a file) into a one-line error."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            where = getattr(e, "filename", None) or what
            raise OutputDirError(f"cannot write {where}: {getattr(e, 'strerror', None) or e}; "
                                 f"{self.last_good()}") from None

    def _resumable_state(self) -> dict[str, Any]:
        """Step counter, RNG, data position, schedule and stage state, taken together at a step boundary: a
        checkpoint written after an interrupt holds the latest one with the weights that go with it."""
        return {"step": self.step, "scheduler_steps": self.scheduler.last_epoch, "rng": rng_state(),
                "data": self.stage.batches.state_dict(), "stage_state": self.stage.state_dict()}

    def save_checkpoint(self, boundary: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint of `boundary` (default: now) atomically and keep the last K (checkpointing.py).
        A failed write leaves the previous checkpoints as they were and stops with a one-line error."""
        boundary = boundary or self._resumable_state()
        # what state.json holds: the boundary (less RNG, which goes per rank under torchrun) and what the
        # checkpoint was written for (stage, trainable parameter names), checked on resume
        state = {"format": STATE_FORMAT, "stage": self.cfg.stage, "trainable": trainable_names(self.stage.model),
                 **{k: v for k, v in boundary.items() if k != "rng"}}
        with self.writing(partial_path(self.out, boundary["step"])):
            final = save_checkpoint(self.out, state, boundary["rng"], self.stage.model, self.optimizer,
                                    self.cfg.train.keep_last, self.dist)
        self.last_checkpoint = final
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer moments, RNG, data position, stage state and step from `path`.

        The optimizer's hyperparameters (lr, betas, eps, weight_decay) and the schedule are this run's
        config, not the checkpoint's: resuming with `--set train.lr=...` trains on at the new peak lr,
        `steps_done` into the schedule, as config.toml (rewritten at each start) then says."""
        path = Path(path)
        state, rng = load_checkpoint(path, self.cfg.stage, self.stage.model, self.optimizer, self.dist)
        for group, settings in zip(self.optimizer.param_groups, self._group_settings):
            group.update(settings)
        self.scheduler = lr_schedule(self.optimizer, self.cfg.train, self.total_steps, state["scheduler_steps"])
        try:
            self.stage.batches.load_state_dict(state["data"])
        except (ValueError, KeyError) as e:
            raise TrainingError(f"{path}: the saved data position does not fit this run's data: {e}") from None
        self.stage.load_state_dict(state["stage_state"])
        if rng is not None:
            set_rng_state(rng)
        else:  # more ranks than the saving run: seeded from seed, rank and step
            seed_everything(self.cfg.train.seed + 1000 * (self.dist.rank if self.dist else 0) + state["step"])
        self.step = state["step"]
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    # -- logging -------------------------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        with self.writing(self.out / "metrics.jsonl"):
            self.metrics_log.write(row)

    def _check_divergence(self, row: dict[str, Any], losses: list[float]) -> None:
        chance = self.stage.chance_loss()
        if chance is None or "loss" not in row:
            return
        losses.append(row["loss"])
        if has_diverged(losses, chance):
            shown = ", ".join(f"{x:.3f}" for x in losses[-DIVERGENCE_PATIENCE:])
            raise TrainingError(f"training diverged at step {self.step}: the last {DIVERGENCE_PATIENCE} logged "
                                f"losses ({shown}) are at or past {chance:.3f}, the loss of a model that has "
                                f"learned nothing (see docs/training.md); {self.last_good()}. Try a lower lr.")

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to total_steps; returns a summary. Ctrl-C saves a checkpoint and returns."""
        if self.run_dir is None:
            self.run_dir = claim_output_dir(self.cfg, self.is_main)
            if self.dist is not None:
                self.dist.barrier()
        try:
            return self._fit()
        finally:
            self.run_dir.release()

    def _fit(self) -> dict[str, Any]:
        self._start()
        status = "completed"
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.stage, dynamic_ncols=True,
                   disable=not self.is_main)
        self._boundary = self._resumable_state()
        self.interrupts.enabled = True
        try:
            self.stage.model.train()
            losses: list[float] = []  # logged training losses, for the divergence check
            while self.step < self.total_steps:
                self._one_step(bar, losses)
            self.run_eval()
        except KeyboardInterrupt:
            status = "interrupted"
            if self.interrupts.torn:
                bar.write(f"interrupted twice while updating the weights of step {self.step + 1}: no checkpoint "
                          f"written; {self.last_good()}")
            else:
                bar.write(f"interrupted at step {self._boundary['step']}: saving a checkpoint")
                self.stage.model.zero_grad(set_to_none=True)  # a half-done step is dropped and redone
                self.save_checkpoint(self._boundary)
        finally:
            self.interrupts.release(raise_pending=False)
            self.interrupts.enabled = False
            bar.close()
            self.metrics_log.close()
        if status == "completed":
            self._save_final()
        self.run_dir.record()
        return {"status": status, "step": self.step, "output_dir": str(self.out)}

    def _start(self) -> None:
        """config.toml, the RNG streams of this rank, the resumed checkpoint if any, metrics.jsonl."""
        t = self.cfg.train
        rank = self.dist.rank if self.dist is not None else 0
        if self.is_main:
            with self.writing(self.out / "config.toml"):
                self.cfg.save(self.out)
        seed_everything(t.seed + 1000 * rank)  # ranks sample (dropout, ppo answers) independently
        resume = resume_path(self.out, t.resume)
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist is not None:
            self.dist.barrier()  # rank 0 may still be cutting metrics.jsonl of a resumed run
        with self.writing(self.out / "metrics.jsonl"):
            self.metrics_log.open(self.step)
        if self.is_main:
            trainable = sum(p.numel() for p in self.stage.model.parameters() if p.requires_grad)
            logger.info("%s: steps %d to %d, %s trainable parameters, writing to %s", self.cfg.stage, self.step + 1,
                        self.total_steps, f"{trainable:,}", self.out)

    def _one_step(self, bar: tqdm, losses: list[float]) -> None:
        """The stage's step, the schedule, the logged row, then evaluation and a checkpoint when due."""
        t = self.cfg.train
        self._boundary = self._resumable_state()  # what an interrupt before this step's update saves
        start = time.perf_counter()
        result = self.stage.train_step(self)
        self.scheduler.step()  # once per trainer step, however many updates the stage made
        # the update is in: from here an interrupt saves the state after this step
        self._boundary = {**self._resumable_state(), "step": self.step + 1}
        self.step = self._boundary["step"]
        elapsed = time.perf_counter() - start
        metrics, tokens = result.metrics, result.tokens
        if self.dist is not None:  # means over ranks; tokens of all ranks
            metrics, tokens = self.dist.mean_metrics(metrics), self.dist.sum(tokens)
        row = {"step": self.step, **self.stage.reduce_metrics(metrics), "learning_rate": self.learning_rate,
               "tokens_per_s": tokens / elapsed, "time/step": elapsed}
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self.log(row)
            self._check_divergence(row, losses)
        self.interrupts.release()  # raises a Ctrl-C held back since the update, the step now logged
        bar.update(1)
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['learning_rate']:.2e}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
            self.run_eval()
        if t.save_every and self.step % t.save_every == 0:
            self.save_checkpoint(self._boundary)

    def _save_final(self) -> None:
        """The stage's save_final with the trained model (under torchrun rank 0 with an unsharded CPU copy of
        it), and curves.png."""
        with self.writing(self.out):
            if self.dist is not None:
                distributed.export_final(self.stage.model, self.skeleton, self.dist,
                                         lambda model: self.stage.save_final(self.out, model))
            else:
                self.stage.save_final(self.out, self.stage.model)
            if self.is_main:
                plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")

    def run_eval(self) -> dict[str, float]:
        self.stage.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.stage.evaluate(self)
        self.stage.model.train()
        if metrics:
            self.log({"step": self.step, **{f"eval/{k}": float(v) for k, v in metrics.items()}})
        return metrics
