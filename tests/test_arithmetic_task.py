"""Tests for minirlhf/tasks/arithmetic.py: correct answers, determinism, train/eval disjointness (even
with an addition's operands swapped), the CLI, and that number_match grades the gold answer 1 and a
wrong one 0."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minirlhf.rewards import number_match
from minirlhf.tasks import arithmetic as A

REPO = Path(__file__).resolve().parents[1]
PROMPT = re.compile(r"What is (\d+) ([+-]) (\d+)\? Answer with just the number\.")


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def solve(prompt):
    a, op, b = PROMPT.fullmatch(prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_rows_have_the_documented_shape_and_right_answers():
    train, held_out = A.split_problems(500, 200, seed=0)
    rows = [p.row() for p in train + held_out]
    assert all(set(r) == {"prompt", "answer"} for r in rows)
    assert all(int(r["answer"]) == solve(r["prompt"]) for r in rows)  # parsed back independently
    operands = [int(x) for r in rows for x in PROMPT.fullmatch(r["prompt"]).group(1, 3)]
    assert min(operands) >= 10 and max(operands) <= 99
    assert all(int(r["answer"]) >= 0 for r in rows)  # subtraction puts the larger operand first
    ops = {PROMPT.fullmatch(r["prompt"]).group(2) for r in rows}
    assert ops == {"+", "-"}
    # both operand orders of additions occur
    additions = [PROMPT.fullmatch(r["prompt"]).group(1, 3) for r in rows if " + " in r["prompt"]]
    assert any(int(a) < int(b) for a, b in additions) and any(int(a) > int(b) for a, b in additions)


def test_train_and_eval_never_share_a_problem():
    train, held_out = A.split_problems(4000, 200, seed=3)
    assert len(train) == 4000 and len(held_out) == 200
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert len({p.key for p in train}) == 4000  # no duplicates inside a split either

    def unordered(prompt):  # independent of Problem.key: operands as a sorted pair for additions
        a, op, b = PROMPT.fullmatch(prompt).groups()
        return (op, *sorted((a, b))) if op == "+" else (op, a, b)

    assert not {unordered(p.prompt) for p in train} & {unordered(p.prompt) for p in held_out}


def test_same_seed_same_bytes_other_seed_other_problems(tmp_path):
    paths_a = A.make_arithmetic_data(tmp_path / "a", 300, 50, seed=7)
    paths_b = A.make_arithmetic_data(tmp_path / "b", 300, 50, seed=7)
    paths_c = A.make_arithmetic_data(tmp_path / "c", 300, 50, seed=8)
    assert [p.read_bytes() for p in paths_a] == [p.read_bytes() for p in paths_b]
    assert paths_a[1].read_bytes() != paths_c[1].read_bytes()


def test_eval_set_does_not_depend_on_the_train_size():
    _, small = A.split_problems(10, 200, seed=1)
    _, large = A.split_problems(3000, 200, seed=1)
    assert small == large


def test_number_match_scores_gold_one_and_wrong_zero():
    _, held_out = A.split_problems(0, 200, seed=0)
    rows = [p.row() for p in held_out]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    assert number_match(prompts, answers, answer=answers) == [1.0] * 200
    assert number_match(prompts, [f"The answer is {a}." for a in answers], answer=answers) == [1.0] * 200
    wrong = [str(int(a) + 1) for a in answers]
    assert number_match(prompts, wrong, answer=answers) == [0.0] * 200


def test_bad_arguments():
    with pytest.raises(A.TaskError, match="distinct problems"):
        A.split_problems(4000, 200, ops="+")  # 90 * 91 / 2 = 4095 additions
    with pytest.raises(A.TaskError, match="ops"):
        A.canonical_problems("*")
    assert len(A.canonical_problems("+")) == 90 * 91 // 2


def test_cli_writes_train_and_eval(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minirlhf.tasks.arithmetic", str(tmp_path), "--train", "30",
                          "--eval", "10", "--seed", "2", "--ops", "+"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    train, held_out = read(tmp_path / "train.jsonl"), read(tmp_path / "eval.jsonl")
    assert len(train) == 30 and len(held_out) == 10
    assert all(" + " in r["prompt"] for r in train + held_out)
    assert [r["prompt"] for r in held_out] == [p.prompt for p in A.split_problems(30, 10, seed=2, ops="+")[1]]
    bad = subprocess.run([sys.executable, "-m", "minirlhf.tasks.arithmetic", str(tmp_path), "--train", "99999"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "distinct problems" in bad.stderr and "Traceback" not in bad.stderr
