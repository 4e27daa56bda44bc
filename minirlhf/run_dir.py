"""A run's output directory: never write over what is not this run's, and only one run writes at a time.

`claim_output_dir(cfg)` runs before anything is written (train.py calls it before the stage is built,
the Trainer otherwise) and enforces:

- output_dir is not an input: not the model, tokenizer, reference, reward or critic directory of the
  run, nor inside one (saving the final model there would overwrite the weights being trained from).
- A fresh run (no resume) needs an output_dir that is missing or empty. One that holds an earlier run
  is refused unless `[train] overwrite = true` (`--overwrite`), which deletes that run's files first:
  only the names the earlier run recorded in `.minirlhf-run.json`; a directory holding anything else
  is refused, overwrite or not, so no file minirlhf did not write is ever deleted.
- `resume = "auto"` (`--resume`) needs a checkpoint in output_dir/checkpoints; resuming from a
  checkpoint elsewhere needs a fresh output_dir, as a fresh run does.
- While a run writes the directory it holds an exclusive lock (fcntl.flock on `.minirlhf.lock`, which
  records its pid); a second run into the same directory stops at once, naming the holder.

The DPO reference log-prob cache (`reference_logps/`, keyed by a hash of data, weights and precision)
is reusable by any run and does not make a directory non-empty, nor does the record of a run that
stopped before it wrote anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from minirlhf.config import Config
from minirlhf.errors import UserError

MARKER = ".minirlhf-run.json"  # {"stage": ..., "entries": [names this run wrote or may write]}
LOCK = ".minirlhf.lock"
REUSABLE = {LOCK, "reference_logps"}
NOTHING_TO_LOSE = REUSABLE | {MARKER}  # a run that stopped before writing anything leaves just these
# what the trainer and the stages may write besides the final model, recorded before they exist so that
# a run killed before its next record() still owns them
RUN_FILES = ["config.toml", "metrics.jsonl", "samples.jsonl", "curves.png", "tensorboard", "checkpoints",
             "reference_logps", MARKER, LOCK]


class OutputDirError(UserError):
    """The output directory cannot be used (not empty, an input, locked, unwritable)."""


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a .tmp folder and never listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def input_dirs(cfg: Config) -> list[tuple[str, str]]:
    """(the key, the directory) of every model directory the run reads."""
    keys = [("[model] path", cfg.model.path), ("[model] tokenizer", cfg.model.tokenizer)]
    if cfg.stage in ("dpo", "kto"):
        keys.append((f"[{cfg.stage}] ref_model", cfg.stage_section.ref_model))
    if cfg.stage == "ppo":
        keys += [("[ppo] reward_model", cfg.ppo.reward_model), ("[ppo] critic_model", cfg.ppo.critic_model),
                 ("[ppo] ref_model", cfg.ppo.ref_model)]
    return [(k, v) for k, v in keys if v]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _unwritable(out: Path, e: OSError) -> OutputDirError:
    return OutputDirError(f"[train] output_dir {out}: cannot write {e.filename or out}: {e.strerror or e}")


class OutputDir:
    """A claimed output directory: its lock (on the main process) and the record of what the run wrote."""

    def __init__(self, path: Path, stage: str, is_main: bool):
        self.path, self.stage, self.is_main = path, stage, is_main
        self._lock_file = None

    def lock(self) -> None:
        """Take the directory's lock, or fail naming the process that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        path = self.path / LOCK
        try:
            f = open(path, "a+")
        except OSError as e:
            raise _unwritable(self.path, e) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise OutputDirError(f"[train] output_dir {self.path} is in use by another run (pid {holder}, lock "
                                 f"{path}); wait for it to finish or choose another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    def record(self, extra: list[str] = ()) -> None:
        """Add every name now in the directory (all written by this run: it was fresh or ours, and locked)
        to the record that a later `overwrite` may delete."""
        if not self.is_main:
            return
        entries = set(read_marker(self.path).get("entries", [])) | set(RUN_FILES) | set(extra)
        entries |= {p.name for p in self.path.iterdir()}
        tmp = self.path / f"{MARKER}.tmp"
        try:
            tmp.write_text(json.dumps({"stage": self.stage, "entries": sorted(entries)}, indent=1))
            os.replace(tmp, self.path / MARKER)
        except OSError as e:
            raise _unwritable(self.path, e) from None


def read_marker(out: Path) -> dict:
    try:
        record = json.loads((out / MARKER).read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def claim_output_dir(cfg: Config, is_main: bool = True) -> OutputDir:
    """Check cfg's output_dir against the rules in the module docstring, lock it (main process), clear it
    when overwriting and record it as this run's. Every rank checks; only the main one writes."""
    t = cfg.train
    out = Path(t.output_dir).resolve()
    for key, folder in input_dirs(cfg):
        folder_path = Path(folder).resolve()
        if _inside(out, folder_path):
            raise OutputDirError(f"[train] output_dir {out} is {'' if out == folder_path else 'inside '}the "
                                 f"{key} directory {folder_path}: the run would write over its input; choose "
                                 f"another output_dir")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"[train] output_dir {out} is a file, not a directory")
    claimed = OutputDir(out, cfg.stage, is_main)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(out, e) from None
        claimed.lock()
    try:
        _check_contents(out, cfg, is_main)
        claimed.record()
    except BaseException:
        claimed.release()
        raise
    return claimed


def _check_contents(out: Path, cfg: Config, is_main: bool) -> None:
    """Resume needs a checkpoint here; a fresh run an empty directory, or an earlier run's to overwrite."""
    t = cfg.train
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if t.resume == "auto" and not checkpoint_dirs(out):
        raise OutputDirError(f"--resume: nothing to resume in {out} (no checkpoint under {out / 'checkpoints'})")
    if t.resume == "auto" or (t.resume and _inside(Path(t.resume).resolve(), out)):
        return
    if not set(present) - NOTHING_TO_LOSE:
        return
    record = read_marker(out)
    unknown = [n for n in present if n not in set(record.get("entries", [])) | REUSABLE]
    if unknown:
        raise OutputDirError(f"[train] output_dir {out} holds files no minirlhf run recorded as its own "
                             f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); choose an "
                             f"empty output_dir")
    if not t.overwrite:
        steps = [p.name for p in checkpoint_dirs(out)]
        ckpt = f" with checkpoints {steps[0]} .. {steps[-1]}" if steps else ""
        raise OutputDirError(f"[train] output_dir {out} holds an earlier {record.get('stage', '')} run{ckpt}: "
                             f"--resume continues it, --overwrite (or [train] overwrite = true) replaces it")
    if is_main:
        for name in present:
            if name in REUSABLE:
                continue
            target = out / name
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            except OSError as e:
                raise _unwritable(out, e) from None
