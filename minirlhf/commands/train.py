"""minirlhf train --stage STAGE --config cfg.toml [--set section.key=value ...] [--resume]
torchrun --nproc_per_node=N train.py ...   (FSDP2 over N processes, see docs/distributed.md)

Runs one stage of the pipeline (pt, sft, rm, dpo, kto, ppo) on an HF-format model directory and
writes the trained model (or LoRA adapter), metrics.jsonl, curves.png and checkpoints into
[train] output_dir. `python train.py ...` is the same command.
"""

from __future__ import annotations

import argparse
import importlib

from minirlhf.commands import run_command
from minirlhf.config import STAGES, load_config

HELP = "train one stage (pt, sft, rm, dpo, kto, ppo) from a TOML config"

# each stage is one module with build_stage(cfg, device) -> trainer.Stage
STAGE_MODULES = {"pt": "minirlhf.sft", "sft": "minirlhf.sft", "rm": "minirlhf.rm", "dpo": "minirlhf.dpo",
                 "kto": "minirlhf.kto", "ppo": "minirlhf.ppo"}
# stages whose build_stage(cfg, device, rank=r) reads the checkpoints on rank 0 only (the other ranks build
# on the meta device, prepare_stage fills them); rm and ppo load their models on every rank
RANK0_LOADING = {"pt", "sft", "dpo", "kto"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=STAGES, help="pipeline stage (or `stage = ...` in the config)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def build_trainer(cfg, device_name: str | None = None):
    """The stage of cfg and its Trainer; under torchrun the stage is sharded first (FSDP2)."""
    import torch

    from minirlhf import distributed
    from minirlhf.trainer import Trainer

    ctx = distributed.init_distributed(cfg)
    device = ctx.device if ctx is not None else \
        torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = {"rank": ctx.rank} if ctx is not None and cfg.stage in RANK0_LOADING else {}
    stage = importlib.import_module(STAGE_MODULES[cfg.stage]).build_stage(cfg, device, **rank)
    if ctx is not None:
        distributed.prepare_stage(stage, ctx)
    return Trainer(cfg, stage, device, dist=ctx)


def train(args: argparse.Namespace) -> dict:
    """Load the config, build the stage, fit; the trainer's summary (status, step, output_dir)."""
    from minirlhf import distributed

    overrides = list(args.set) + (['train.resume="auto"'] if args.resume else [])
    cfg = load_config(args.config, overrides, stage=args.stage)
    trainer = build_trainer(cfg, args.device)
    try:
        return trainer.fit()
    finally:
        distributed.close(trainer.dist)


def run(args: argparse.Namespace) -> int:
    summary = train(args)
    print(f"{summary['status']} at step {summary['step']}: {summary['output_dir']}")
    return 0 if summary["status"] == "completed" else 130


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: parse argv, run, and print a user's error as one line (exit 2)."""
    return run_command(run, parse_args(argv))
