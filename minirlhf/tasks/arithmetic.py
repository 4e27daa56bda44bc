"""Two-digit arithmetic with the answer as a number: a verifiable task for the grpo stage.

    {"prompt": "What is 59 + 63? Answer with just the number.", "answer": "122"}

Operands run over 10..99. Subtraction puts the larger operand first, so answers are never negative.
The rows are in the `prompt` data format (the prompt becomes one user turn of the chat template) and
`answer` is what `minirlhf.rewards:number_match` compares the completion's last number with.

Train and eval never share a problem, not even with the operands of an addition swapped: the problems
are enumerated once in a canonical form (larger operand first), shuffled with `seed`, and the first
`n_eval` go to eval, the next `n_train` to train; only then is the order of each addition's operands
drawn. So the same seed gives byte-identical files, and the eval set does not depend on `n_train`.

    python -m minirlhf.tasks.arithmetic OUT_DIR [--train 2000] [--eval 200] [--seed 0] [--ops +-]

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from minirlhf.errors import UserError

PROMPT_TEMPLATE = "What is {a} {op} {b}? Answer with just the number."
OPERAND_RANGE = (10, 99)  # inclusive: two-digit operands
OPERATIONS = ("+", "-")


class TaskError(UserError):
    """Bad arguments for a generated task (an unknown operation, more problems than exist)."""


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, op=self.op, b=self.b)

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def key(self) -> tuple[int, str, int]:
        """The same for `a + b` and `b + a`: what train and eval must not share."""
        return (max(self.a, self.b), self.op, min(self.a, self.b)) if self.op == "+" else (self.a, self.op, self.b)

    def row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


def canonical_problems(ops: str | tuple[str, ...] = OPERATIONS) -> list[Problem]:
    """Every problem once, larger operand first, in a fixed order."""
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown or not ops:
        raise TaskError(f"arithmetic: ops must be a non-empty selection of {''.join(OPERATIONS)!r}, got {ops!r}")
    low, high = OPERAND_RANGE
    return [Problem(a, op, b) for op in OPERATIONS if op in ops
            for a in range(low, high + 1) for b in range(low, a + 1)]


def split_problems(n_train: int, n_eval: int, seed: int = 0,
                   ops: str | tuple[str, ...] = OPERATIONS) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): disjoint problem lists of the requested sizes, a function of `seed` only."""
    problems = canonical_problems(ops)
    if n_train < 0 or n_eval < 0 or n_train + n_eval > len(problems):
        raise TaskError(f"arithmetic: asked for {n_train} train + {n_eval} eval problems; ops {''.join(ops)!r} "
                        f"have {len(problems)} distinct problems")
    rng = random.Random(seed)
    rng.shuffle(problems)
    chosen = problems[: n_eval + n_train]  # eval first, so it does not depend on n_train
    oriented = [Problem(p.b, p.op, p.a) if p.op == "+" and rng.random() < 0.5 else p for p in chosen]
    return oriented[n_eval:], oriented[:n_eval]


def write_jsonl(path: str | Path, problems: list[Problem]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.row()) + "\n" for p in problems))
    return path


def make_arithmetic_data(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                         ops: str | tuple[str, ...] = OPERATIONS) -> tuple[Path, Path]:
    """Write out_dir/train.jsonl and out_dir/eval.jsonl; returns their paths."""
    train, held_out = split_problems(n_train, n_eval, seed, ops)
    out = Path(out_dir)
    return write_jsonl(out / "train.jsonl", train), write_jsonl(out / "eval.jsonl", held_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minirlhf.tasks.arithmetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training problems (default 2000)")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="".join(OPERATIONS), help="operations to use, e.g. '+' or '+-' (default)")
    args = parser.parse_args(argv)
    try:
        train, held_out = make_arithmetic_data(args.out_dir, args.train, args.eval, args.seed, tuple(args.ops))
    except TaskError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.train} problems to {train} and {args.eval} to {held_out}")


if __name__ == "__main__":
    main()
