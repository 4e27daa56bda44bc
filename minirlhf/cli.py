"""The `minirlhf` command: everything a user does with the library, one subcommand each.

    minirlhf train    --stage sft --config cfg.toml       train one stage
    minirlhf chat     --model runs/sft                    talk to a model in the terminal
    minirlhf generate --model M --prompts p.jsonl --out answers.jsonl
    minirlhf eval     --policy A --baseline B --reward-model RM --prompts p.jsonl --out report.json
    minirlhf merge    --base B --adapter A --out merged   a LoRA adapter folded into its base
    minirlhf export   --model runs/rm --out rm-hf         a reward model as *ForSequenceClassification

`python -m minirlhf ...` is the same command; `minirlhf COMMAND --help` documents each one.
"""

from __future__ import annotations

import argparse
import sys

from minirlhf.commands import chat, evaluate, export, generate, merge, run_command, train

COMMANDS = {"train": train, "chat": chat, "generate": generate, "eval": evaluate, "merge": merge, "export": export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minirlhf", description=__doc__.split("\n\n")[0],
        epilog="Run `minirlhf COMMAND --help` for the options of one command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(COMMANDS[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())
