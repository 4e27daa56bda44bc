"""minirlhf train --stage STAGE --config cfg.toml [--set section.key=value ...] [--resume | --overwrite]
torchrun --nproc_per_node=N train.py ...   (FSDP2 over N processes, see docs/distributed.md)

Runs one stage of the pipeline (pt, sft, rm, dpo, kto, ppo, grpo: the registry in minirlhf/stages) on
an HF-format model directory and writes the trained model (or LoRA adapter), metrics.jsonl, curves.png
and checkpoints into [train] output_dir. `python train.py ...` is the same command.
"""

from __future__ import annotations

import argparse
import logging
import os

from minirlhf.commands import run_command
from minirlhf.errors import UserError
from minirlhf.stages import REGISTRY

HELP = f"train one stage ({', '.join(REGISTRY)}) from a TOML config"


class DeviceError(UserError, ValueError):
    """--device names no device this machine has."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=list(REGISTRY), help="pipeline stage (or `stage = ...` in the config)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in output_dir (deletes only the files that run wrote)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def configure_logging() -> None:
    """minirlhf's info lines on stderr (one process speaks under torchrun: the others show warnings only).
    Leaves the root logger alone when something (a test runner, an application) already configured it."""
    rank = os.environ.get("RANK", "0")
    logging.getLogger("minirlhf").setLevel(logging.INFO if rank == "0" else logging.WARNING)
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
    logging.basicConfig(format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def resolve_device(name: str | None):
    """torch.device of --device (default: cuda when available), refusing one this machine does not have."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                              f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'})")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: there are {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: minirlhf trains on cpu, cuda or mps")
    return device


def build_stage(cfg, device, ctx=None):
    """The stage of cfg (its build function in the stage registry), built after torch's thread count is set
    ([train] threads) and every RNG seeded with [train] seed, so that what the stage draws while it is built
    (LoRA's initialisation, a fresh model) is the same in every run. Under torchrun (ctx) a stage that
    declares rank-0 loading gets the rank; the Trainer then shards it."""
    import torch

    from minirlhf import stages
    from minirlhf.checkpointing import seed_everything

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    spec = stages.spec(cfg.stage)
    rank = ctx.rank if ctx is not None and spec.rank0_loading else None
    return spec.build(cfg, device, rank)


def build_trainer(cfg, device_name: str | None = None):
    """The stage of cfg and its Trainer (which, under torchrun, shards the stage with FSDP2). The output
    directory is checked and locked (run_dir.claim_output_dir) before anything is built."""
    from minirlhf import distributed
    from minirlhf.run_dir import claim_output_dir
    from minirlhf.trainer import Trainer

    ctx = distributed.init_distributed(cfg)
    device = ctx.device if ctx is not None else resolve_device(device_name)
    run_dir = claim_output_dir(cfg, is_main=ctx is None or ctx.is_main)
    try:
        if ctx is not None:
            ctx.barrier()  # rank 0 has cleared (--overwrite) and locked the directory
        return Trainer(cfg, build_stage(cfg, device, ctx), device, dist=ctx, run_dir=run_dir)
    except BaseException:
        run_dir.release()
        raise


def train(args: argparse.Namespace) -> dict:
    """Load the config, build the stage, fit; the trainer's summary (status, step, output_dir)."""
    from minirlhf import distributed
    from minirlhf.config import load_config

    overrides = list(args.set) + (['train.resume="auto"'] if args.resume else []) + \
        (["train.overwrite=true"] if args.overwrite else [])
    cfg = load_config(args.config, overrides, stage=args.stage)
    finished = False
    try:
        summary = build_trainer(cfg, args.device).fit()
        finished = True
        return summary
    finally:  # every rank that got here without an error meets the others before the group goes
        distributed.close(barrier=finished)


def run(args: argparse.Namespace) -> int:
    configure_logging()
    summary = train(args)
    print(f"{summary['status']} at step {summary['step']}: {summary['output_dir']}")
    return 0 if summary["status"] == "completed" else 130


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: parse argv, run, and print a user's error as one line (exit 2)."""
    return run_command(run, parse_args(argv))
