"""minirlhf merge --adapter DIR [--base DIR] --out DIR [--dtype float32|bfloat16|float16]

Folds a LoRA adapter (PEFT layout, e.g. the output_dir of a stage run with [lora] enabled) into its base
model, W' = W + s B A for every adapted projection, and writes a full Hugging Face model directory with
the tokenizer files (the adapter's own, else the base's). --base defaults to the base that the adapter's
adapter_config.json names. The output directory must not exist yet (or be empty).
`python -m minirlhf.lora merge --base B --adapter A --out O` does the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minirlhf.commands import CommandError

HELP = "fold a LoRA adapter into its base model and write a full model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory (PEFT layout)")
    p.add_argument("--base", metavar="DIR",
                   help="base model directory (default: base_model_name_or_path of the adapter's config)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, or empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="load and save in this dtype (default: as stored)")


def check_new_directory(path: str | Path, *inputs: Path) -> Path:
    """An output directory that does not exist yet or is empty, and is none of the inputs."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CommandError(f"--out {path} exists and is not an empty directory; choose a new one")
    if any(path.resolve() == p.resolve() for p in inputs):
        raise CommandError(f"--out {path} is one of the inputs")
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    from minirlhf.commands.loading import resolve_model_paths
    from minirlhf.lora import merge_and_save

    paths = resolve_model_paths(args.base or args.adapter, args.adapter if args.base else None)
    if paths.adapter is None:
        raise CommandError(f"{args.adapter} is not a LoRA adapter directory: it has no adapter_config.json")
    out = check_new_directory(args.out, paths.base, paths.adapter)
    merge_and_save(paths.base, paths.adapter, out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged {paths.adapter} into {paths.base} -> {out}")
    return 0
