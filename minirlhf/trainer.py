"""The one training loop every stage shares.

A stage (sft.py, rm.py, dpo.py, kto.py, ppo.py) says what a batch's loss is; the trainer does the
rest: AdamW with warmup and decay, gradient accumulation, clipping, precision, evaluation, logging,
atomic checkpoints with exact resume, Ctrl-C, and stopping on a non-finite loss.

    step = one optimizer update = grad_accum micro-batches (ppo: one rollout and its PPO epochs)

Checkpoints live in OUTPUT/checkpoints/step-NNNNNNN/ and hold everything that changes during
training: the trainable weights (all of them, or the LoRA adapter), optimizer and scheduler states,
the RNG states, the data position and whatever the stage keeps (e.g. ppo's KL controller). A
checkpoint is written to a temporary folder and renamed into place, so a kill mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minirlhf.config import Config
from minirlhf.errors import UserError


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

    def train_step(self, trainer: "Trainer") -> StepResult:
        """One optimizer step: accumulate grad_accum micro-batches, then update. ppo overrides this."""
        accum = trainer.cfg.train.grad_accum
        totals: dict[str, torch.Tensor] = {}  # summed on the device, read once per step
        tokens = 0
        for _ in range(accum):
            batch = next(self.batches)
            tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))  # on the host
            batch = trainer.to_device(batch)
            with trainer.autocast():
                loss, metrics = self.loss(batch)
            trainer.backward(loss / accum, metrics)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / accum
        metrics = {k: float(v) for k, v in totals.items()}
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
# RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a .tmp folder and never listed)."""
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def fsync_files(files) -> None:
    """Make the bytes durable before a rename publishes them."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """Runs a Stage under a Config: `Trainer(cfg, stage).fit()`."""

    def __init__(self, cfg: Config, stage: Stage, device: torch.device | str | None = None, dist=None):
        """dist: a distributed.DistContext when run under torchrun (the stage already prepared by
        distributed.prepare_stage), else None."""
        self.cfg = cfg
        self.stage = stage
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.last_checkpoint: Path | None = None
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
        self.total_steps = self._total_steps()
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.schedule, t.min_lr_ratio)
        )

    # -- pieces a stage's train_step uses ------------------------------------------------------

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return t.epochs * self.stage.steps_per_epoch()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def autocast(self):
        return autocast_for(self.cfg.train.precision, self.device)

    def backward(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None) -> None:
        """Backpropagate, refusing a non-finite loss before it can reach the weights."""
        if not bool(torch.isfinite(loss)):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was written yet"
            shown = {k: round(float(v), 4) for k, v in (metrics or {}).items()}
            raise TrainingError(f"non-finite loss ({float(loss)}) at step {self.step + 1}; metrics {shown}; "
                                f"{where}. Try a lower lr, fp32 precision, or check the data.")
        loss.backward()

    def optimizer_step(self, advance_schedule: bool = True) -> dict[str, float]:
        """Clip, step and (unless told not to) advance the lr schedule; returns grad_norm and lr.

        ppo makes several updates per trainer step and advances the schedule once per rollout."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
            norm = norm.full_tensor()
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite gradient norm at step {self.step + 1}; "
                                f"last good checkpoint: {self.last_checkpoint or 'none yet'}")
        self.optimizer.step()
        if advance_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": self.optimizer.param_groups[0]["lr"]}

    # -- checkpoints ---------------------------------------------------------------------------

    def _resumable_state(self) -> dict[str, Any]:
        """RNG, data position and stage state: taken at each step boundary, so that a Ctrl-C in the
        middle of a step saves the state from before it and the resumed run redoes that step."""
        return {"rng": rng_state(), "data": self.stage.batches.state_dict(), "stage": self.stage.state_dict()}

    def save_checkpoint(self, boundary: dict[str, Any] | None = None) -> Path:
        """Write step-N atomically (temporary folder, then rename) and keep the last K."""
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        if self.dist is not None:
            return self._save_sharded(tmp, final, boundary)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(self.stage.model), tmp / "trainable.safetensors")
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), **(boundary or self._resumable_state())}
        torch.save(state, tmp / "state.pt")
        fsync_files(tmp.iterdir())
        self._publish(tmp, final)
        self.last_checkpoint = final
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename a complete checkpoint folder into place (atomic), then drop all but the last K."""
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(self.out)[: -self.cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_sharded(self, tmp: Path, final: Path, boundary: dict[str, Any] | None) -> Path:
        """The torchrun version of save_checkpoint: every rank writes its shards (DCP) and RNG state into
        the temporary folder, rank 0 the run state; after a barrier rank 0 renames it into place."""
        from minirlhf import distributed

        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.dist.barrier()
        state = {**(boundary or self._resumable_state())}
        distributed.save_sharded(tmp, self.stage.model, self.optimizer)
        own = tmp / f"rng-{self.dist.rank}.pt"
        torch.save(state.pop("rng"), own)
        files = [own]
        if self.is_main:
            torch.save({"step": self.step, "scheduler": self.scheduler.state_dict(), "world_size":
                        self.dist.world_size, **state}, tmp / "state.pt")
            files = list(tmp.iterdir())
        fsync_files(files)
        self.dist.barrier()
        if self.is_main:
            self._publish(tmp, final)
        self.dist.barrier()
        self.last_checkpoint = final
        return final

    def _load_sharded(self, path: Path) -> None:
        """Resume from a DCP checkpoint, on any world size (or in a plain process). A rank without a saved
        RNG state (more ranks than the saving run) is seeded from seed, rank and step."""
        from minirlhf import distributed

        try:
            distributed.load_sharded(path, self.stage.model, self.optimizer)
        except Exception as e:  # DCP names the first missing key or mismatched shape
            raise TrainingError(f"{path}: sharded checkpoint does not fit this run: {e}") from e
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage.batches.load_state_dict(state["data"])
        self.stage.load_state_dict(state["stage"])
        rank = self.dist.rank if self.dist is not None else 0
        rng = path / f"rng-{rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        else:
            seed_everything(self.cfg.train.seed + 1000 * rank + state["step"])
        self.step = state["step"]
        self.last_checkpoint = path

    def load_checkpoint(self, path: Path) -> None:
        from minirlhf.distributed import is_sharded_checkpoint

        if is_sharded_checkpoint(path):
            return self._load_sharded(path)
        weights = load_file(path / "trainable.safetensors")
        params = dict(self.stage.model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if set(weights) != trainable:
            missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
            raise TrainingError(f"{path}: checkpoint does not fit this run's trainable parameters "
                                f"(missing {missing[:5]}, unexpected {extra[:5]})")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage.batches.load_state_dict(state["data"])
        self.stage.load_state_dict(state["stage"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = path

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if not resume:
            return None
        if resume == "auto":
            found = checkpoint_dirs(self.out)
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "state.pt").exists():
            raise TrainingError(f"[train] resume: {path} is not a checkpoint (no state.pt)")
        return path

    # -- logging -------------------------------------------------------------------------------

    def _open_metrics(self):
        """metrics.jsonl, and every other per-step log (ppo's samples.jsonl), cut back to the resumed step
        so the curves continue without a seam."""
        for path in self.out.glob("*.jsonl"):
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            path.write_text("".join(line + "\n" for line in kept))
        return open(self.out / "metrics.jsonl", "a")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to total_steps; returns a summary. Ctrl-C saves a checkpoint and returns."""
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        rank = self.dist.rank if self.dist is not None else 0
        if self.is_main:
            self.cfg.save(self.out)
        seed_everything(t.seed + 1000 * rank)  # ranks sample (dropout, ppo answers) independently
        resume = self._resume_path()
        if resume is not None:
            self.load_checkpoint(resume)
        if self.dist is not None:
            self.dist.barrier()  # rank 0 may still be cutting metrics.jsonl of a resumed run
        self._metrics_file = self._open_metrics() if self.is_main else open(os.devnull, "w")
        self._tb = self._tensorboard() if self.is_main else None
        status = "completed"
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.stage, dynamic_ncols=True,
                   disable=not self.is_main)
        try:
            self.stage.model.train()
            while self.step < self.total_steps:
                self._boundary = self._resumable_state()
                start = time.perf_counter()
                result = self.stage.train_step(self)
                self.step += 1
                elapsed = time.perf_counter() - start
                metrics, tokens = result.metrics, result.tokens
                if self.dist is not None:  # means over ranks; tokens of all ranks
                    metrics, tokens = self.dist.mean_metrics(metrics), self.dist.sum(tokens)
                row = {"step": self.step, **metrics, "tokens_per_s": tokens / elapsed}
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row.get('lr', 0):.2e}",
                                tok_s=f"{row['tokens_per_s']:.0f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.run_eval()
                if t.save_every and self.step % t.save_every == 0:
                    self.save_checkpoint()
            self.run_eval()
        except KeyboardInterrupt:
            status = "interrupted"
            bar.write(f"interrupted at step {self.step}: saving a checkpoint")
            self.stage.model.zero_grad(set_to_none=True)  # a half-done step is dropped and redone
            self.save_checkpoint(self._boundary)
        finally:
            bar.close()
            self._metrics_file.close()
            if self._tb is not None:
                self._tb.close()
        if status == "completed":
            if self.dist is not None:
                from minirlhf.distributed import export_final

                export_final(self.stage, self.out, self.dist)
            else:
                self.stage.save_final(self.out)
            if self.is_main:
                plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
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
