"""The one training loop every stage shares.

A stage (sft.py, rm.py, dpo.py, kto.py, ppo.py) says what a batch's loss is; the trainer does the
rest: AdamW with warmup and decay, gradient accumulation, clipping, precision, evaluation, logging,
atomic checkpoints with exact resume, Ctrl-C, and stopping on a non-finite or diverged loss.

    step = one optimizer update = grad_accum micro-batches (ppo: one rollout and its PPO epochs)

Checkpoints live in OUTPUT/checkpoints/step-NNNNNNN/ and hold everything that changes during
training: the trainable weights (all of them, or the LoRA adapter), optimizer state, the RNG states,
the data position and whatever the stage keeps (e.g. ppo's KL controller), as safetensors and JSON
(train_state.py: nothing on disk is unpickled). A checkpoint is written to a temporary folder and
renamed into place, so a kill mid-save leaves the previous checkpoint intact. The step counter, data
position, RNG and weights of a checkpoint always belong together: a Ctrl-C that arrives while the
weights are being updated is held back until the step is complete (see `DeferredInterrupt`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from minirlhf.checkpoint import save_safetensors
from minirlhf.config import Config
from minirlhf.errors import UserError
from minirlhf.run_dir import OutputDir, OutputDirError, checkpoint_dirs, claim_output_dir
from minirlhf.train_state import load_tree, rng_state, save_tree, set_rng_state

logger = logging.getLogger(__name__)

__all__ = ["Stage", "StepResult", "Trainer", "TrainingError", "autocast_for", "checkpoint_dirs", "decay_groups",
           "has_diverged", "lr_factor", "plot_metrics", "seed_everything"]

STATE_FORMAT = 2  # 1: state.pt (a pickle, no longer read); 2: state.json + safetensors
DIVERGENCE_PATIENCE = 3  # consecutive logged losses


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


@dataclass
class StepResult:
    """What one optimizer step reports: scalar metrics and the number of tokens it trained on."""

    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


def decay_groups(module: nn.Module, lr: float | None = None) -> list[dict[str, Any]]:
    """A module's trainable parameters as two AdamW groups: weight decay on matrices except embeddings
    ("weight_decay": None means [train] weight_decay), none on norms, biases and embeddings. `lr`
    overrides [train] lr for both groups (ppo's critic)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": None}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return groups


class Stage:
    """What a stage plugs into the trainer. Subclasses set `model` and `batches` and define `loss`.

    `model`   the module that owns every trainable parameter (policy, value head, adapters ...)
    `batches` a resumable iterator of micro-batches (data.BatchIterator): `next()`,
              `state_dict()`, `load_state_dict()`, `batches_per_epoch`
    """

    model: nn.Module
    batches: Any

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss of one micro-batch and detached metrics (each a scalar tensor)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped for AdamW (see `decay_groups`)."""
        return decay_groups(self.model)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int | None:
        """How many tokens the mean that `loss` returns is taken over (pt/sft: the trained labels), read
        on the host before the batch moves to the device. The trainer weights each micro-batch's mean by
        it, so that a step's gradient is the mean over every trained token of the accumulated batch (and
        of all ranks). None (the default): the loss is a mean over sequences or pairs (rm, dpo, kto) and
        every micro-batch counts the same."""
        return None

    def chance_loss(self) -> float | None:
        """The training loss of a model that has learned nothing (pt/sft: ln V, a uniform guess over the
        vocabulary), by which the trainer recognises a diverged run (`has_diverged`); None = unchecked."""
        return None

    def train_step(self, trainer: "Trainer") -> StepResult:
        """One optimizer step: accumulate grad_accum micro-batches, then update. ppo overrides this."""
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

    def steps_per_epoch(self) -> int:
        """Trainer steps in one pass over the data (ppo: over the prompts, one rollout a step)."""
        return math.ceil(self.batches.batches_per_epoch / self.cfg.train.grad_accum)

    def frozen_modules(self) -> list[nn.Module]:
        """Models the stage runs but does not train and that are not inside `model` (a frozen reference
        copy, a reward model), for distributed.prepare_stage to shard too; none by default."""
        return []

    def evaluate(self, trainer: "Trainer") -> dict[str, float]:
        """Metrics on the eval data (prefixed "eval/" by the trainer); none by default."""
        return {}

    def save_final(self, out_dir: Path) -> None:
        """Write the trained model (HF format, or the adapter) into out_dir."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Stage state beyond weights, optimizer and data that a resume needs (e.g. ppo's KL coef)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# precision and schedule


def autocast_for(precision: str, device: torch.device | str):
    """bf16 autocast on GPU (or when asked for with precision = "bf16"), plain float32 otherwise.
    Passes outside the loop (dpo's reference precompute, ppo's rollout) use it to match training."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()



def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup over `warmup` steps, then cosine (Loshchilov
    & Hutter 2017), linear or constant decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# RNG, divergence, interrupts


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (and CUDA's, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class DeferredInterrupt:
    """Holds Ctrl-C (SIGINT) back from `hold()` to `release()`, which then raises the KeyboardInterrupt.

    The trainer holds it from the moment it starts updating the weights until the step counter, data
    position and RNG state after the step are recorded, so that an interrupt never leaves weights of one
    step with the position of another. A second Ctrl-C while held interrupts at once and marks the state
    `torn` (the trainer then writes no checkpoint). Only the main thread can take signals, and only
    Python's default SIGINT handler (Ctrl-C raises KeyboardInterrupt) is replaced; otherwise (SIGINT
    ignored, as in a background job, or handled by the application) holding does nothing.
    """

    def __init__(self):
        self.enabled = False  # the trainer's loop enables it; a stage stepped by hand is left alone
        self.pending = False
        self.torn = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.pending:
            self.torn = True
            raise KeyboardInterrupt
        self.pending = True

    def hold(self) -> None:
        if not self.enabled or self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # SIGINT ignored, or someone else's handler: theirs
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._handler)

    def release(self, raise_pending: bool = True) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._previous = None
        pending, self.pending = self.pending, False
        if pending and raise_pending:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# checkpoints


def fsync_files(files) -> None:
    """Make the bytes durable before a rename publishes them."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Runs a Stage under a Config: `Trainer(cfg, stage).fit()`."""

    def __init__(self, cfg: Config, stage: Stage, device: torch.device | str | None = None, dist=None,
                 run_dir: OutputDir | None = None):
        """dist: a distributed.DistContext when run under torchrun (the stage already prepared by
        distributed.prepare_stage), else None. run_dir: the output directory already claimed for this run
        (run_dir.claim_output_dir, as train.py does before building the stage); fit() claims it when None
        and releases it when done."""
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
        self._boundary: dict[str, Any] | None = None
        groups = stage.param_groups()
        for g in groups:
            if g.get("weight_decay") is None:
                g["weight_decay"] = cfg.train.weight_decay
            g.setdefault("lr", cfg.train.lr)
            g["initial_lr"] = g["lr"]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise TrainingError("the model has no trainable parameters")
        fused = self.device.type == "cuda" and not (dist is not None and dist.cpu_offload)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                           eps=cfg.train.adam_eps, fused=fused)
        # what this run's config says of each group; a resumed optimizer state keeps its moments, not these
        self._group_settings = [{k: g[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay")}
                                for g in self.optimizer.param_groups]
        self.total_steps = self._total_steps()
        self.scheduler = self._make_scheduler(0)

    # -- pieces a stage's train_step uses ------------------------------------------------------

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return t.epochs * self.stage.steps_per_epoch()

    def _make_scheduler(self, steps_done: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The lr schedule of this run's config, `steps_done` steps in (lr = initial_lr * lr_factor)."""
        t = self.cfg.train
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.schedule, t.min_lr_ratio),
            last_epoch=steps_done - 1)

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
                                f"{self._last_good()}. Try a lower lr, fp32 precision, or check the data.")
        loss.backward()

    def optimizer_step(self, advance_schedule: bool = True) -> dict[str, float]:
        """Clip, step and (unless told not to) advance the lr schedule; returns grad_norm and learning_rate.

        ppo makes several updates per trainer step and advances the schedule once per rollout. From the
        first update of a step to its end, Ctrl-C is held back (see `fit`)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
            norm = norm.full_tensor()
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite gradient norm at step {self.step + 1}; {self._last_good()}")
        self.interrupts.hold()
        self.optimizer.step()
        if advance_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "learning_rate": self.optimizer.param_groups[0]["lr"]}

    # -- checkpoints ---------------------------------------------------------------------------

    def _last_good(self) -> str:
        return f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was written yet"

    @contextmanager
    def _writing(self, what: Path) -> Iterator[None]:
        """Turn a failed write (a read-only or full disk, a path that is a file) into a one-line error."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            where = getattr(e, "filename", None) or what
            raise OutputDirError(f"cannot write {where}: {getattr(e, 'strerror', None) or e}; "
                                 f"{self._last_good()}") from None

    def _resumable_state(self) -> dict[str, Any]:
        """Step counter, RNG, data position, schedule and stage state, taken together at a step boundary: a
        checkpoint written after an interrupt holds the latest one with the weights that go with it."""
        return {"step": self.step, "scheduler_steps": self.scheduler.last_epoch, "rng": rng_state(),
                "data": self.stage.batches.state_dict(), "stage_state": self.stage.state_dict()}

    def _run_state(self, boundary: dict[str, Any]) -> dict[str, Any]:
        """What state.json holds: the boundary (less RNG, which goes per rank under torchrun) and what the
        checkpoint was written for (stage, trainable parameter names), checked on resume."""
        names = sorted(n for n, p in self.stage.model.named_parameters() if p.requires_grad)
        return {"format": STATE_FORMAT, "stage": self.cfg.stage, "trainable": names,
                **{k: v for k, v in boundary.items() if k != "rng"}}

    def save_checkpoint(self, boundary: dict[str, Any] | None = None) -> Path:
        """Write step-N atomically (temporary folder, then rename) and keep the last K. A failed write
        leaves the previous checkpoints as they were and stops with a one-line error."""
        boundary = boundary or self._resumable_state()
        root = self.out / "checkpoints"
        final = root / f"step-{boundary['step']:07d}"
        tmp = root / f".tmp-step-{boundary['step']:07d}"
        try:
            with self._writing(tmp):
                if self.dist is not None:
                    self._save_sharded(tmp, final, boundary)
                else:
                    self._save_single(tmp, final, boundary)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_checkpoint = final
        return final

    def _save_single(self, tmp: Path, final: Path, boundary: dict[str, Any]) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(trainable_state(self.stage.model), tmp / "trainable.safetensors")
        save_tree(self.optimizer.state_dict(), tmp, "optimizer")
        save_tree({**self._run_state(boundary), "rng": boundary["rng"]}, tmp, "state")
        fsync_files(tmp.iterdir())
        self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename a complete checkpoint folder into place (atomic), then drop all but the last K."""
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(self.out)[: -self.cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_sharded(self, tmp: Path, final: Path, boundary: dict[str, Any]) -> None:
        """The torchrun version: every rank writes its shards (DCP) and RNG state into the temporary
        folder, rank 0 the run state; after a barrier rank 0 renames it into place."""
        from minirlhf import distributed

        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        distributed.save_sharded(tmp, self.stage.model, self.optimizer)
        files = save_tree(boundary["rng"], tmp, f"rng-{self.dist.rank}")
        if self.is_main:
            save_tree({**self._run_state(boundary), "world_size": self.dist.world_size}, tmp, "state")
            files = list(tmp.iterdir())
        fsync_files(files)
        self.dist.barrier()
        if self.is_main:
            self._publish(tmp, final)
        self.dist.barrier()

    def _read(self, path: Path, read):
        """read() of a checkpoint's files, a damaged file becoming a one-line error."""
        try:
            return read()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:  # RuntimeError: shapes
            raise TrainingError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None

    def _check_fits(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another format, another stage, or other trainable parameters (LoRA vs full)."""
        if state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{path}: checkpoint format {state.get('format')}, this minirlhf reads format "
                                f"{STATE_FORMAT}")
        if state.get("stage") != self.cfg.stage:
            raise TrainingError(f"{path}: a checkpoint of a {state.get('stage')} run cannot resume this "
                                f"{self.cfg.stage} run (start from that run's exported model: [model] path)")
        trainable = {n for n, p in self.stage.model.named_parameters() if p.requires_grad}
        saved = set(state.get("trainable", []))
        if saved != trainable:
            missing, extra = sorted(trainable - saved), sorted(saved - trainable)
            raise TrainingError(f"{path}: checkpoint does not fit this run's trainable parameters "
                                f"(missing {missing[:5]}, unexpected {extra[:5]})")

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer moments, RNG, data position, stage state and step from `path`.

        The optimizer's hyperparameters (lr, betas, eps, weight_decay) and the schedule are this run's
        config, not the checkpoint's: resuming with `--set train.lr=...` trains on at the new peak lr,
        `steps_done` into the schedule, as config.toml (rewritten at each start) then says."""
        from minirlhf.distributed import is_sharded_checkpoint

        path = Path(path)
        if not (path / "state.json").exists():
            if (path / "state.pt").exists():
                raise TrainingError(f"{path}: written by an older minirlhf (state.pt, a pickle), which is not "
                                    f"read because unpickling can run arbitrary code; start afresh")
            raise TrainingError(f"{path}: not a checkpoint (no state.json)")
        state = self._read(path, lambda: load_tree(path, "state"))
        self._check_fits(path, state)
        if is_sharded_checkpoint(path):
            rng = self._load_sharded(path, state)
        else:
            rng = state["rng"]
            self._read(path, lambda: self._load_single(path))
        for group, settings in zip(self.optimizer.param_groups, self._group_settings):
            group.update(settings)
        self.scheduler = self._make_scheduler(state["scheduler_steps"])
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

    def _load_single(self, path: Path) -> None:
        weights = load_file(path / "trainable.safetensors")
        params = dict(self.stage.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(load_tree(path, "optimizer"))

    def _load_sharded(self, path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """Shards from a DCP checkpoint, on any world size (or in a plain process); returns this rank's
        saved RNG state, None when the saving run had fewer ranks."""
        from minirlhf import distributed

        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            distributed.load_sharded(path, self.stage.model, self.optimizer)
        except (Exception, CheckpointException) as e:  # DCP names the first missing key or mismatched shape
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # DCP's message holds a traceback
            raise TrainingError(f"{path}: sharded checkpoint does not fit this run or is damaged: {last}") from e
        name = f"rng-{self.dist.rank if self.dist is not None else 0}"
        if not (path / f"{name}.json").exists():
            return None
        return self._read(path, lambda: load_tree(path, name))

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if not resume:
            return None
        if resume == "auto":
            found = checkpoint_dirs(self.out)
            if not found:
                raise TrainingError(f"--resume: nothing to resume in {self.out} (no checkpoint under "
                                    f"{self.out / 'checkpoints'})")
            return found[-1]
        path = Path(resume)
        if not path.is_dir():
            raise TrainingError(f"[train] resume: {path} is not a checkpoint folder")
        return path

    # -- logging -------------------------------------------------------------------------------

    def _open_metrics(self):
        """metrics.jsonl, and every other per-step log (ppo's samples.jsonl), cut back to the resumed step
        so the curves continue without a seam; a line torn by a kill mid-write is dropped."""
        for path in self.out.glob("*.jsonl"):
            kept, torn = [], 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    row, torn = None, torn + 1
                if isinstance(row, dict) and row.get("step", 0) <= self.step:
                    kept.append(line)
            if torn:
                logger.warning("%s: dropped %d unreadable line(s) (cut by a kill mid-write)", path, torn)
            path.write_text("".join(line + "\n" for line in kept))
        return open(self.out / "metrics.jsonl", "a")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        with self._writing(self.out / "metrics.jsonl"):
            self._metrics_file.write(json.dumps(row) + "\n")
            self._metrics_file.flush()
            if self._tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self._tb.add_scalar(k, v, row["step"])

    def _check_divergence(self, row: dict[str, Any], losses: list[float]) -> None:
        chance = self.stage.chance_loss()
        if chance is None or "loss" not in row:
            return
        losses.append(row["loss"])
        if has_diverged(losses, chance):
            shown = ", ".join(f"{x:.3f}" for x in losses[-DIVERGENCE_PATIENCE:])
            raise TrainingError(f"training diverged at step {self.step}: the last {DIVERGENCE_PATIENCE} logged "
                                f"losses ({shown}) are at or past {chance:.3f}, the loss of a model that has "
                                f"learned nothing (see docs/training.md); {self._last_good()}. Try a lower lr.")

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
        t = self.cfg.train
        rank = self.dist.rank if self.dist is not None else 0
        if self.is_main:
            with self._writing(self.out / "config.toml"):
                self.cfg.save(self.out)
        seed_everything(t.seed + 1000 * rank)  # ranks sample (dropout, ppo answers) independently
        resume = self._resume_path()
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist is not None:
            self.dist.barrier()  # rank 0 may still be cutting metrics.jsonl of a resumed run
        with self._writing(self.out / "metrics.jsonl"):
            self._metrics_file = self._open_metrics() if self.is_main else open(os.devnull, "w")
            self._tb = self._tensorboard() if self.is_main else None
        status = "completed"
        losses: list[float] = []  # logged training losses, for the divergence check
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.stage, dynamic_ncols=True,
                   disable=not self.is_main)
        if self.is_main:
            trainable = sum(p.numel() for p in self.stage.model.parameters() if p.requires_grad)
            logger.info("%s: steps %d to %d, %s trainable parameters, writing to %s", self.cfg.stage, self.step + 1,
                        self.total_steps, f"{trainable:,}", self.out)
        self._boundary = self._resumable_state()
        self.interrupts.enabled = True
        try:
            self.stage.model.train()
            while self.step < self.total_steps:
                self._boundary = self._resumable_state()  # what an interrupt before this step's update saves
                start = time.perf_counter()
                result = self.stage.train_step(self)
                # the update is in: from here an interrupt saves the state after this step
                self._boundary = {**self._resumable_state(), "step": self.step + 1}
                self.step = self._boundary["step"]
                elapsed = time.perf_counter() - start
                metrics, tokens = result.metrics, result.tokens
                if self.dist is not None:  # means over ranks; tokens of all ranks
                    metrics, tokens = self.dist.mean_metrics(metrics), self.dist.sum(tokens)
                row = {"step": self.step, **metrics, "tokens_per_s": tokens / elapsed, "time/step": elapsed}
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.log(row)
                    self._check_divergence(row, losses)
                self.interrupts.release()  # raises a Ctrl-C held back since the update, the step now logged
                bar.update(1)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                lr=f"{row.get('learning_rate', 0):.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.run_eval()
                if t.save_every and self.step % t.save_every == 0:
                    self.save_checkpoint(self._boundary)
            self.run_eval()
        except KeyboardInterrupt:
            status = "interrupted"
            if self.interrupts.torn:
                bar.write(f"interrupted twice while updating the weights of step {self.step + 1}: no checkpoint "
                          f"written; {self._last_good()}")
            else:
                bar.write(f"interrupted at step {self._boundary['step']}: saving a checkpoint")
                self.stage.model.zero_grad(set_to_none=True)  # a half-done step is dropped and redone
                self.save_checkpoint(self._boundary)
        finally:
            self.interrupts.release(raise_pending=False)
            self.interrupts.enabled = False
            bar.close()
            self._metrics_file.close()
            if self._tb is not None:
                self._tb.close()
        if status == "completed":
            with self._writing(self.out):
                if self.dist is not None:
                    from minirlhf.distributed import export_final

                    export_final(self.stage, self.out, self.dist)
                else:
                    self.stage.save_final(self.out)
                if self.is_main:
                    plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
        self.run_dir.record()
        return {"status": status, "step": self.step, "output_dir": str(self.out)}

    def run_eval(self) -> dict[str, float]:
        self.stage.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.stage.evaluate(self)
        self.stage.model.train()
        if metrics:
            self.log({"step": self.step, **{f"eval/{k}": float(v) for k, v in metrics.items()}})
        return metrics


def plot_metrics(metrics_path: Path, png_path: Path, keys: Iterator[str] | None = None) -> Path | None:
    """Draw every numeric metric of metrics.jsonl against step into one PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no %s: matplotlib is not installed (pip install matplotlib)", png_path.name)
        return None
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and (keys is None or k in keys):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(v)
    if not series:
        return None
    n = len(series)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, (k, (xs, ys)) in zip(axes.flat, sorted(series.items())):
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
