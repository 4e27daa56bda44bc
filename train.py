"""python train.py --stage STAGE --config cfg.toml [--set section.key=value ...] [--resume]
torchrun --nproc_per_node=N train.py ...   (FSDP2 over N processes, see docs/distributed.md)

Runs one stage of the pipeline (pt, sft, rm, dpo, kto, ppo) on an HF-format model directory and
writes the trained model (or LoRA adapter), metrics.jsonl, curves.png and checkpoints into
[train] output_dir.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minirlhf.config import STAGES, load_config
from minirlhf.errors import UserError

# each stage is one module with build_stage(cfg, device) -> trainer.Stage
STAGE_MODULES = {"pt": "minirlhf.sft", "sft": "minirlhf.sft", "rm": "minirlhf.rm", "dpo": "minirlhf.dpo",
                 "kto": "minirlhf.kto", "ppo": "minirlhf.ppo"}
# stages whose build_stage(cfg, device, rank=r) reads the checkpoints on rank 0 only (the other ranks build
# on the meta device, prepare_stage fills them); rm and ppo load their models on every rank
RANK0_LOADING = {"pt", "sft", "dpo", "kto"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, help="pipeline stage (or `stage = ...` in the config)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
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


def run(argv: list[str] | None = None) -> dict:
    from minirlhf import distributed

    args = parse_args(argv)
    overrides = list(args.set) + (['train.resume="auto"'] if args.resume else [])
    cfg = load_config(args.config, overrides, stage=args.stage)
    trainer = build_trainer(cfg, args.device)
    try:
        return trainer.fit()
    finally:
        distributed.close(trainer.dist)


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(argv)
    except UserError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"{summary['status']} at step {summary['step']}: {summary['output_dir']}")
    return 0 if summary["status"] == "completed" else 130


if __name__ == "__main__":
    sys.exit(main())
