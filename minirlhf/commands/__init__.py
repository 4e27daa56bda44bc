"""The subcommands of the `minirlhf` command line, one module each.

Every command module exposes the same three things, which `minirlhf/cli.py` wires into one parser:

    HELP: str                                    one line, shown by `minirlhf --help`
    add_arguments(parser: ArgumentParser)        its options
    run(args: Namespace) -> int                  the work; the exit status

Modules import torch and the rest of minirlhf inside `run`, so `minirlhf --help` answers at once.
A `UserError` escaping `run` is printed as one line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from minirlhf.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class CommandError(UserError):
    """A command-line argument or file that a command cannot use as given."""


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args), with a user's error as one line on stderr (exit 2) and Ctrl-C as exit 130."""
    try:
        return run(args)
    except UserError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
