"""Training checkpoints: everything that changes while a run trains, written so that a resume continues
exactly where the run stopped, and read back without unpickling anything.

    OUTPUT/checkpoints/step-NNNNNNN/
        trainable.safetensors            the trainable weights (all of them, or the LoRA adapter)
        optimizer.json + .safetensors    AdamW's state
        state.json (+ .safetensors)      step, schedule position, data position, the stage's own state
                                         (e.g. ppo's KL controller), the RNG states, and what the checkpoint
                                         was written for (format, stage, trainable parameter names)
    under torchrun: DCP shards of the weights and optimizer (+ .metadata), rng-R.json per rank, state.json

A checkpoint is written into a temporary folder (.tmp-step-N), its files fsync'd, and renamed into place
(`publish`), so a kill mid-save leaves the previous checkpoint intact; the last [train] keep_last are kept.

State goes to disk as a tree of dicts, lists, numbers, strings and tensors, written as JSON with its tensors
in a safetensors file next to it (`save_tree` / `load_tree`). `torch.load` of a pickle runs whatever code
the file names, so a checkpoint folder downloaded or crafted by someone else would be a program; JSON and
safetensors are data only. In the JSON, a tensor is {"__tensor__": key} (its key in the safetensors
file), a tuple is {"__tuple__": [...]}, and a dict with int keys (the optimizer's per-parameter state) is
{"__int_keys__": {"0": ...}}; every other value is itself. Any other kind of object is refused when
saving, so what loads is exactly what was saved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from minirlhf.errors import TrainingError
from minirlhf.hf_checkpoint import save_safetensors
from minirlhf.run_dir import checkpoint_dirs

STATE_FORMAT = 2  # 1: state.pt (a pickle, no longer read); 2: state.json + safetensors
TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# where checkpoints live


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:07d}"


def partial_path(output_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into before `publish` renames it."""
    return Path(output_dir) / "checkpoints" / f".tmp-step-{step:07d}"


def resume_path(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint [train] resume names: None for "", the latest one in output_dir for "auto", else the
    folder given."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise TrainingError(f"--resume: nothing to resume in {output_dir} (no checkpoint under "
                                f"{Path(output_dir) / 'checkpoints'})")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise TrainingError(f"[train] resume: {path} is not a checkpoint folder")
    return path


# --------------------------------------------------------------------------------------------------
# writing


def fsync_files(files: Iterable[Path]) -> None:
    """Make the bytes durable before a rename publishes them."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def trainable_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def save_checkpoint(output_dir: Path, state: dict[str, Any], rng: dict[str, Any], model: nn.Module,
                    optimizer: torch.optim.Optimizer, keep_last: int, dist=None) -> Path:
    """Write the checkpoint of step state["step"] atomically and keep the last `keep_last`; returns its folder.

    state: what state.json holds (format, stage, trainable names, step, schedule and data position, stage
    state); rng: this process's RNG states. dist: the DistContext under torchrun (every rank calls this),
    else None. A failed write leaves the previous checkpoints as they were and removes the partial folder.
    """
    final, tmp = checkpoint_path(output_dir, state["step"]), partial_path(output_dir, state["step"])
    is_main = dist is None or dist.is_main
    try:
        if dist is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
            save_tree(optimizer.state_dict(), tmp, "optimizer")
            save_tree({**state, "rng": rng}, tmp, "state")
            fsync_files(tmp.iterdir())
            publish(tmp, final, output_dir, keep_last)
        else:
            _save_sharded(tmp, final, state, rng, model, optimizer, keep_last, output_dir, dist)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_sharded(tmp: Path, final: Path, state: dict[str, Any], rng: dict[str, Any], model: nn.Module,
                  optimizer: torch.optim.Optimizer, keep_last: int, output_dir: Path, dist) -> None:
    """The torchrun version: every rank writes its shards (DCP) and RNG state into the temporary folder,
    rank 0 the run state; after a barrier rank 0 renames it into place."""
    from minirlhf import distributed

    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    distributed.save_sharded(tmp, model, optimizer)  # DCP fsyncs the shard files it writes
    files = save_tree(rng, tmp, f"rng-{dist.rank}")
    if dist.is_main:
        files += save_tree({**state, "world_size": dist.world_size}, tmp, "state")
    # each rank syncs the files it wrote: a listing of the folder taken now could hold another rank's
    # half-written file under its temporary name, gone (renamed) by the time it is opened
    fsync_files(files)
    dist.barrier()
    if dist.is_main:
        publish(tmp, final, output_dir, keep_last)
    dist.barrier()


def publish(tmp: Path, final: Path, output_dir: Path, keep_last: int) -> None:
    """Rename a complete checkpoint folder into place (atomic), then drop all but the last `keep_last`."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: Path, read: Callable[[], T]) -> T:
    """read() of a checkpoint's files, a damaged file becoming a one-line TrainingError."""
    try:
        return read()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:  # RuntimeError: shapes
        raise TrainingError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    dist=None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check that `path` is a checkpoint of this run (format, stage, trainable parameters), load its weights
    into `model` and its moments into `optimizer`; returns (the run state of state.json, this rank's RNG
    state, None when a sharded checkpoint was written by fewer ranks)."""
    path = Path(path)
    if not (path / "state.json").exists():
        if (path / "state.pt").exists():
            raise TrainingError(f"{path}: written by an older minirlhf (state.pt, a pickle), which is not "
                                f"read because unpickling can run arbitrary code; start afresh")
        raise TrainingError(f"{path}: not a checkpoint (no state.json)")
    from minirlhf.distributed import is_sharded_checkpoint

    state = read_checkpoint(path, lambda: load_tree(path, "state"))
    _check_fits(path, state, stage, model)
    if is_sharded_checkpoint(path):
        return state, _load_sharded(path, model, optimizer, dist)
    read_checkpoint(path, lambda: _load_single(path, model, optimizer))
    return state, state["rng"]


def _check_fits(path: Path, state: dict[str, Any], stage: str, model: nn.Module) -> None:
    """Refuse a checkpoint of another format, another stage, or other trainable parameters (LoRA vs full)."""
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: checkpoint format {state.get('format')}, this minirlhf reads format "
                            f"{STATE_FORMAT}")
    if state.get("stage") != stage:
        raise TrainingError(f"{path}: a checkpoint of a {state.get('stage')} run cannot resume this "
                            f"{stage} run (start from that run's exported model: [model] path)")
    trainable, saved = set(trainable_names(model)), set(state.get("trainable", []))
    if saved != trainable:
        missing, extra = sorted(trainable - saved), sorted(saved - trainable)
        raise TrainingError(f"{path}: checkpoint does not fit this run's trainable parameters "
                            f"(missing {missing[:5]}, unexpected {extra[:5]})")


def _load_single(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(load_tree(path, "optimizer"))


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist) -> dict[str, Any] | None:
    """Shards from a DCP checkpoint, on any world size (or in a plain process); returns this rank's saved RNG
    state, None when the saving run had fewer ranks."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from minirlhf import distributed

    try:
        distributed.load_sharded(path, model, optimizer)
    except (Exception, CheckpointException) as e:  # DCP names the first missing key or mismatched shape
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # DCP's message holds a traceback
        raise TrainingError(f"{path}: sharded checkpoint does not fit this run or is damaged: {last}") from e
    name = f"rng-{dist.rank if dist is not None else 0}"
    if not (path / f"{name}.json").exists():
        return None
    return read_checkpoint(path, lambda: load_tree(path, name))


# --------------------------------------------------------------------------------------------------
# trees of tensors as JSON + safetensors


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {INT_KEYS: {str(k): _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}}
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpointing: {key}: dict keys must be all str or all int, got {list(value)[:5]}")
        if value.keys() & {TENSOR, TUPLE, INT_KEYS}:
            raise TypeError(f"checkpointing: {key}: a key collides with the format's markers")
        return {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpointing: {key}: cannot store a {type(value).__name__} (only tensors, dicts, lists, "
                    f"tuples, numbers, strings, None)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if INT_KEYS in value:
        return {int(k): _decode(v, tensors) for k, v in value[INT_KEYS].items()}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_tree(tree: dict[str, Any], folder: Path, name: str) -> list[Path]:
    """Write `tree` as folder/name.json (+ folder/name.safetensors when it holds tensors); returns the files."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    files = [folder / f"{name}.json"]
    files[0].write_text(json.dumps(encoded))
    if tensors:
        files.append(folder / f"{name}.safetensors")
        save_safetensors(tensors, files[1])
    return files


def load_tree(folder: Path, name: str) -> dict[str, Any]:
    """The tree save_tree wrote. Raises ValueError (bad JSON, a missing tensor), OSError, or safetensors'
    error for a corrupt tensor file."""
    encoded = json.loads((folder / f"{name}.json").read_text())
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.exists() else {}
    try:
        return _decode(encoded, tensors)
    except KeyError as e:
        raise ValueError(f"{tensor_file}: no tensor {e}") from None


# --------------------------------------------------------------------------------------------------
# RNG states


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (and CUDA's, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as a tree save_tree stores: python's (version, 625 ints, gauss), numpy's
    MT19937 (key as a list of ints), torch's and CUDA's (uint8 tensors)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, [int(k) for k in key], int(pos), int(has_gauss),
                                                     float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
