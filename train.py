"""python train.py --stage STAGE --config cfg.toml [--set section.key=value ...] [--resume | --overwrite]

The same command as `minirlhf train` (minirlhf/commands/train.py), kept so that existing scripts and
torchrun lines work unchanged.
"""

import sys

from minirlhf.commands.train import build_trainer, main, parse_args, train  # noqa: F401 (re-exported)

if __name__ == "__main__":
    sys.exit(main())
