"""minirlhf export --model RM_DIR --out DIR
minirlhf export --checkpoint OUTPUT/checkpoints/step-NNNNNNN --out DIR

Writes a reward model as a Hugging Face `*ForSequenceClassification` directory (num_labels = 1: the
backbone, `score.weight`, the tokenizer files), which transformers loads with
AutoModelForSequenceClassification and TRL takes as a reward model; see minirlhf/heads.py.

  --model RM_DIR     a reward model directory (an rm run's output_dir, a ppo run's output_dir/critic),
                     written again, e.g. in another --dtype
  --checkpoint CKPT  a checkpoint of an rm run (plain or sharded): the model is rebuilt from the run's
                     config.toml (in the run's output_dir, two levels up), the checkpoint's weights
                     loaded, and the model saved as the run would have saved it had it ended there:
                     a LoRA adapter merged into the backbone, the score statistics of the training data
                     recorded for ppo's normalisation.

The output directory must not exist yet (or be empty).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minirlhf.commands import CommandError

HELP = "write a reward model (an rm run's output or one of its checkpoints) as *ForSequenceClassification"


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="RM_DIR", help="a reward model directory")
    source.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint directory of an rm run "
                                                             "(OUTPUT/checkpoints/step-NNNNNNN)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, or empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="--model only: save in this dtype (default: as stored)")


def export_checkpoint(checkpoint: Path, out: Path) -> None:
    """Rebuild the rm run of `checkpoint` from its config.toml, load the checkpoint, save_final into out."""
    from minirlhf.commands.train import build_stage
    from minirlhf.config import load_config
    from minirlhf.trainer import Trainer

    config = checkpoint.parent.parent / "config.toml"
    if not config.is_file():
        raise CommandError(f"{checkpoint}: the run's config {config} is missing (a checkpoint lives in "
                           f"OUTPUT/checkpoints/step-N, beside OUTPUT/config.toml)")
    cfg = load_config(config)
    if cfg.stage != "rm":
        raise CommandError(f"{checkpoint} is a checkpoint of a {cfg.stage} run; export writes reward models (rm "
                           f"runs). A LoRA policy merges with `minirlhf merge`.")
    # the run is rebuilt, not claimed: its output directory is only read
    trainer = Trainer(cfg, build_stage(cfg, "cpu"), "cpu")
    trainer.load_checkpoint(checkpoint)  # a folder that is not a checkpoint is a one-line TrainingError
    trainer.stage.save_final(out)


def run(args: argparse.Namespace) -> int:
    from minirlhf.commands.loading import load_chat_tokenizer, load_reward_model
    from minirlhf.commands.merge import check_new_directory

    source = Path(args.model or args.checkpoint)
    out = check_new_directory(args.out, source)
    if args.checkpoint:
        if args.dtype:
            raise CommandError("--dtype applies to --model; a checkpoint is saved in its run's dtype")
        export_checkpoint(source, out)
    else:
        import torch

        model = load_reward_model(source, dtype=getattr(torch, args.dtype) if args.dtype else None)
        tok = load_chat_tokenizer(source, fallback=False)  # written back as it is
        model.save_pretrained(out, tokenizer=tok)
    print(f"reward model -> {out} (load it with transformers' AutoModelForSequenceClassification)")
    return 0
