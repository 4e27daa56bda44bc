"""`python -m minirlhf ...`: the `minirlhf` command (see minirlhf/cli.py)."""

import sys

from minirlhf.cli import main

sys.exit(main())
