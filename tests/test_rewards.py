"""Tests for minirlhf/rewards.py: the built-in reward functions on hand-picked completions, loading by
name (module and file) with its one-line errors, the field check, and score_completions' checks."""

import logging
import math

import pytest
import torch

from minirlhf import rewards as R
from minirlhf.errors import UserError


# ---------------------------------------------------------------------------------------------------
# built-ins


@pytest.mark.parametrize("completion, answer, expected", [
    ("122", "122", 1.0),
    ("The answer is 122.", "122", 1.0),  # trailing full stop
    ("59 + 63 = 122", 122, 1.0),  # the last number counts; an int answer
    ("122.0", "122", 1.0),  # numerically equal
    ("It is 1,234", "1234", 1.0),  # thousands separator
    ("-48", "-48", 1.0),
    ("\u221248", "-48", 1.0),  # Unicode minus sign
    ("x = -48", "-48", 1.0),
    ("48", "-48", 0.0),
    ("121", "122", 0.0),
    ("122 or maybe 123", "122", 0.0),  # the last number is the answer given
    ("I don't know", "122", 0.0),
    ("", "122", 0.0),
    ("#### 72", "The total is #### 72", 1.0),  # a GSM8K-style answer: its last number
])
def test_number_match(completion, answer, expected):
    assert R.number_match([""], [completion], answer=[answer]) == [expected]


def test_last_number_parsing():
    assert R.last_number("a 3.50 b") == R.last_number("3.5")
    assert R.last_number("x-3") == 3  # a hyphen glued to a word is not a minus sign
    assert R.last_number("5, 6 and 7") == 7
    assert R.last_number("no digits") is None


def test_number_match_answer_without_number_is_an_error():
    with pytest.raises(ValueError, match="holds no number"):
        R.number_match([""], ["12"], answer=["twelve"])


def test_exact_match():
    assert R.exact_match(["", "", ""], [" 122\n", "122.", "1 22"], answer=["122", "122", "122"]) == [1.0, 0.0, 0.0]


def test_format_match_constant_and_per_row_pattern():
    completions = ["<answer>5</answer>", "  <answer>\n5\n</answer>  ", "5", "<answer>5</answer> extra"]
    pattern = r"<answer>.*</answer>"
    # whole (stripped) completion; `.` spans newlines
    assert R.format_match([""] * 4, completions, pattern=pattern) == [1.0, 1.0, 0.0, 0.0]
    assert R.format_match([""] * 2, ["5", "x"], pattern=[r"\d", r"\d"]) == [1.0, 0.0]


def test_soft_overlong_penalty_follows_dapo_eq_13():
    # L_max = 20, L_cache = 4: free up to 16 tokens; then (16 - n) / 4 down to -1 at 20; beyond, -1
    got = R.soft_overlong_penalty([""] * 6, [""] * 6, completion_lengths=[3, 16, 17, 18, 20, 25],
                                  max_length=20, cache_length=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        R.soft_overlong_penalty([""], [""], completion_lengths=[1], max_length=4, cache_length=5)


def test_builtins_accept_extra_fields_like_trl_passes():
    # TRL calls every reward function with all dataset columns and more (trainer_state, completion_ids)
    assert R.number_match(prompts=["p"], completions=["7"], answer=["7"], completion_ids=[[1]], trainer_state=None) \
        == [1.0]


# ---------------------------------------------------------------------------------------------------
# loading by name


def test_load_builtin_by_module_spec():
    fn = R.load_reward_function("minirlhf.rewards:number_match")
    assert fn.name == "minirlhf.rewards:number_match"
    assert fn(["q"], ["12"], answer=["12"]) == [1.0]


def test_load_from_file_relative_to_config_folder(tmp_path):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "my_rewards.py").write_text(
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Box:\n"  # a class inside the file: works only if the module is registered while it runs
        "    x: float\n"
        "def has_format(prompts, completions, **kwargs):\n"
        "    return [Box(1.0).x if c.startswith('A:') else 0.0 for c in completions]\n"
    )
    fn = R.load_reward_function("rw/my_rewards.py:has_format", base_dir=tmp_path)
    assert fn(["q", "q"], ["A: 3", "3"]) == [1.0, 0.0]
    # the same file again is the same module, not a second copy
    again = R.load_reward_function(f"{tmp_path}/rw/my_rewards.py:has_format")
    assert again.fn is fn.fn


@pytest.mark.parametrize("spec, match", [
    ("number_match", "expected 'package.module:function'"),
    ("minirlhf.rewards:", "expected"),
    (":number_match", "expected"),
    ("minirlhf rewards:number_match", "expected"),
    ("minirlhf.no_such_module:f", r"cannot import minirlhf.no_such_module: ModuleNotFoundError"),
    ("minirlhf.rewards:number_matc", r"has no attribute 'number_matc'; did you mean 'number_match'\?"),
    ("minirlhf.rewards:STAGE_FIELDS", "is a tuple, not a function"),
    ("missing.py:f", "no file"),
])
def test_load_errors_are_one_line_and_name_the_spec(spec, match, tmp_path):
    with pytest.raises(R.RewardError, match=match) as info:
        R.load_reward_function(spec, base_dir=tmp_path)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message


def test_load_error_carries_the_import_failure(tmp_path):
    (tmp_path / "broken.py").write_text("import numpy\nraise RuntimeError('boom at import')\n")
    with pytest.raises(R.RewardError, match="cannot import .*broken.py: RuntimeError: boom at import"):
        R.load_reward_function("broken.py:f", base_dir=tmp_path)
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with pytest.raises(R.RewardError, match="SyntaxError"):
        R.load_reward_function("syntax.py:f", base_dir=tmp_path)


def test_load_binds_config_constants():
    fn = R.load_reward_function("minirlhf.rewards:format_match", kwargs={"pattern": r"\d+"})
    assert fn(["", ""], ["12", "x"]) == [1.0, 0.0]
    assert R.required_fields(fn) == ()
    with pytest.raises(R.RewardError, match="cannot set parameter 'patern'"):
        R.load_reward_function("minirlhf.rewards:exact_match", kwargs={"patern": "x"})
    with pytest.raises(R.RewardError, match="cannot set parameter 'completions'"):
        R.load_reward_function("minirlhf.rewards:format_match", kwargs={"completions": []})


def test_load_rejects_a_function_without_the_calling_convention(tmp_path):
    (tmp_path / "bad.py").write_text("def f(texts):\n    return [0.0] * len(texts)\n")
    with pytest.raises(R.RewardError, match="must take the keyword arguments prompts and completions"):
        R.load_reward_function("bad.py:f", base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------
# fields


def test_required_fields_come_from_the_signature():
    assert R.required_fields(R.number_match) == ("answer",)
    assert R.required_fields(R.format_match) == ("pattern",)
    assert R.required_fields(R.soft_overlong_penalty) == ("completion_lengths", "max_length", "cache_length")

    def optional(prompts, completions, answer=None, **kwargs):
        return [0.0] * len(completions)

    assert R.required_fields(optional) == ()


def test_check_reward_fields_fails_before_compute():
    R.check_reward_fields([R.number_match], ["answer", "id"])
    overlong = R.load_reward_function("minirlhf.rewards:soft_overlong_penalty",
                                      kwargs={"max_length": 16, "cache_length": 4})
    R.check_reward_fields([overlong], [])  # completion_lengths is a stage field
    with pytest.raises(R.RewardError, match=r"'minirlhf.rewards:number_match' needs the field 'answer'.*"
                                            r"their columns: id, question"):
        R.check_reward_fields([R.load_reward_function("minirlhf.rewards:number_match")], ["question", "id"])


def test_fields_are_passed_by_name_and_config_constants_win():
    seen = {}

    def named_only(prompts, completions, answer):
        seen["answer"] = answer
        return [1.0] * len(completions)

    fields = {"answer": ["1", "2"], "other": ["a", "b"], "completion_lengths": [3, 4]}
    R.score_completions([named_only], ["p", "q"], ["1", "3"], fields)
    assert seen == {"answer": ["1", "2"]}  # no **kwargs: only what it names
    # a constant bound in the config is not overridden by a data column of the same name
    fn = R.load_reward_function("minirlhf.rewards:format_match", kwargs={"pattern": r"\d"})
    got = R.score_completions([fn], ["p", "q"], ["1", "x"], {"pattern": ["x", "x"]})
    assert got[:, 0].tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# score_completions


def test_score_completions_table_with_none_as_nan():
    def half(prompts, completions, **kwargs):
        return [None if c == "skip" else 0.5 for c in completions]

    got = R.score_completions([R.number_match, half], ["p"] * 3, ["7", "skip", "8"], {"answer": ["7", "7", "7"]})
    assert got.shape == (3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.5], [0.0, math.nan], [0.0, 0.5]]), equal_nan=True)


def test_score_completions_accepts_tensors_and_numpy_values():
    import numpy as np

    as_tensor = lambda prompts, completions, **kw: torch.tensor([1.0, 2.0])
    as_numpy = lambda prompts, completions, **kw: [np.float32(1.5), True]
    trl_style = lambda completions, **kwargs: [float(len(c)) for c in completions]  # prompts arrive in kwargs
    got = R.score_completions([as_tensor, as_numpy, trl_style], ["p", "q"], ["a", "bc"])
    assert got.tolist() == [[1.0, 1.5, 1.0], [2.0, 1.0, 2.0]]


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


def returns_nan(prompts, completions, **kwargs):
    return [1.0, float("nan"), 0.0]


def returns_inf(prompts, completions, **kwargs):
    return [1.0, 0.0, float("inf")]


def returns_text(prompts, completions, **kwargs):
    return [1.0, "0.5", 0.0]


def returns_scalar(prompts, completions, **kwargs):
    return 1.0


def fails_on_one_row(prompts, completions, **kwargs):
    return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty completion


@pytest.mark.parametrize("fn, match", [
    (wrong_length, r"'tests.test_rewards:wrong_length' returned 1 rewards for 3 completions"),
    (returns_nan, r"'tests.test_rewards:returns_nan' returned nan for row 1 \(prompt 'p1'\)"),
    (returns_inf, r"returned inf for row 2 \(prompt 'p2'\); rewards must be finite"),
    (returns_text, r"returned '0.5' \(str\) for row 1"),
    (returns_scalar, r"returned a float; expected a list of 3 numbers"),
    (fails_on_one_row, r"'tests.test_rewards:fails_on_one_row' failed on row 1 \(prompt 'p1'\): "
                       r"ZeroDivisionError: float division by zero"),
])
def test_score_completions_errors_name_the_function_and_row(fn, match):
    fn.__module__ = "tests.test_rewards"  # the name errors use, however pytest imported this file
    with pytest.raises(R.RewardError, match=match) as info:
        R.score_completions([fn], ["p0", "p1", "p2"], ["ab", "", "c"])
    assert "\n" not in str(info.value)


def test_score_completions_error_names_the_data_row_when_given():
    with pytest.raises(R.RewardError, match=r"failed on train.jsonl line 8 \(prompt 'p1'\)"):
        R.score_completions([fails_on_one_row], ["p0", "p1"], ["ab", ""], rows=["train.jsonl line 7",
                                                                                 "train.jsonl line 8"])


def test_score_completions_batch_only_failure():
    def needs_two(prompts, completions, **kwargs):
        if len(completions) < 3:
            raise RuntimeError("batch too small")
        raise RuntimeError("always")

    with pytest.raises(R.RewardError, match="failed on row 0"):
        R.score_completions([needs_two], ["p"] * 3, ["a"] * 3)

    def only_batch(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("only together")
        return [0.0]

    with pytest.raises(R.RewardError, match="on no single one alone.*RuntimeError: only together"):
        R.score_completions([only_batch], ["p"] * 2, ["a"] * 2)


def test_score_completions_warns_on_unscorable_rows(caplog):
    skip_all = lambda prompts, completions, **kw: [None if c == "x" else 1.0 for c in completions]
    with caplog.at_level(logging.WARNING, logger="minirlhf.rewards"):
        got = R.score_completions([skip_all], ["p0", "p1"], ["a", "x"])
    assert math.isnan(got[1, 0]) and "1 of 2 completions got None from every reward function (first: row 1" \
        in caplog.text


def test_score_completions_checks_shapes_and_fields():
    with pytest.raises(ValueError, match="field 'answer' has 1 values for 2 completions"):
        R.score_completions([R.number_match], ["p", "q"], ["1", "2"], {"answer": ["1"]})
    with pytest.raises(R.RewardError, match="needs the field 'answer'"):
        R.score_completions([R.number_match], ["p"], ["1"], {})
