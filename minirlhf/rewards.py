"""Reward functions for verifiable tasks, and how a config names, loads, checks and calls them.

The calling convention is TRL GRPOTrainer's, so a function written for one runs in the other:

    fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]

- `prompts[i]`, `completions[i]`: the i-th prompt as the data row gives it and the i-th decoded completion
  (N of each; with k samples per prompt a prompt appears k times, prompt-major). Both arrive as keywords.
- `fields`: keyword arguments, each a list of N values aligned with the completions: the data row's other
  columns (e.g. `answer`) and what the stage measures, `STAGE_FIELDS`: `completion_lengths` (generated
  tokens of each completion, its stop token included).
- A function receives the fields its signature names, or all of them when it takes `**kwargs`. A keyword
  parameter without a default is *required*: it must be a column of every data row, a stage field, or be
  fixed in the config as a constant (`load_reward_function(..., kwargs={"pattern": ...})`, which binds it
  once for every row). `check_reward_fields` checks this before any compute.
- It returns one number per completion, or None where it does not apply (the completion then takes its
  reward from the other functions; one that no function scores gets advantage 0, as in TRL). NaN, inf,
  a wrong length or an exception are errors naming the function and the row (`score_completions`).

A config names a function as "package.module:function" (e.g. "minirlhf.rewards:number_match") or
"path/to/file.py:function", the path relative to the config file's folder; the file is imported from
its path (importlib), never by changing sys.path.

Built-ins: `number_match`, `exact_match` (against the row's `answer`), `format_match` (a regex, `pattern`),
`soft_overlong_penalty` (DAPO's length shaping, `max_length` and `cache_length`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from minirlhf.errors import UserError

logger = logging.getLogger(__name__)

# Fields the stage computes for every completion, on top of the data row's columns.
STAGE_FIELDS: tuple[str, ...] = ("completion_lengths",)
# The two arguments every reward function receives, by these names.
CALL_ARGS: tuple[str, ...] = ("prompts", "completions")


class RewardError(UserError):
    """A reward function that cannot be loaded, cannot be called with the data, or returned bad values."""


# ---------------------------------------------------------------------------------------------------
# built-in reward functions

# A number: an optional minus sign (not glued to a word: "x-3" is 3), digits with optional thousands
# commas, an optional decimal part. A trailing full stop is not part of it ("It is 122." -> 122).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # the Unicode minus and the en dash


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` ("1,234", "-5", "3.50", "It is 122." -> 122), exactly, or None."""
    matches = _NUMBER.findall(str(text).translate(_MINUS_SIGNS))
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:  # cannot happen for what _NUMBER matches; kept as a guard
        return None


def number_match(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the last number in the completion equals the row's `answer` numerically, else 0.0.

    "The sum is 1,234." matches answer "1234"; "122.0" matches 122. A completion without any number
    scores 0; an answer without a number is an error (a data problem, not a wrong completion).
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        target = last_number(str(gold))
        if target is None:
            raise ValueError(f"answer {gold!r} holds no number")
        got = last_number(completion)
        scores.append(1.0 if got is not None and got == target else 0.0)
    return scores


def exact_match(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion equals the row's `answer` after stripping surrounding whitespace, else 0.0."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def format_match(prompts: list[str], completions: list[str], pattern: str | list[str], **_: Any) -> list[float]:
    """1.0 when the whole completion (stripped) matches the regular expression `pattern`, else 0.0.

    `pattern` is usually a constant from the config (kwargs={"pattern": r"<answer>.*</answer>"}); a data
    column named `pattern` gives one per row instead. `.` matches newlines too (re.DOTALL).
    """
    patterns = [pattern] * len(completions) if isinstance(pattern, str) else pattern
    return [1.0 if re.fullmatch(p, c.strip(), flags=re.DOTALL) else 0.0
            for c, p in zip(completions, patterns, strict=True)]


def soft_overlong_penalty(prompts: list[str], completions: list[str], completion_lengths: list[int],
                          max_length: int, cache_length: int, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13), with |y| the completion's tokens:

        R(y) = 0                                         |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache       L_max - L_cache < |y| <= L_max
             = -1                                        |y| > L_max

    L_max = max_length, L_cache = cache_length (0 < L_cache <= L_max), constants from the config; DAPO adds
    this to the correctness reward. completion_lengths comes from the stage (see STAGE_FIELDS).
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    free = max_length - cache_length
    return [0.0 if n <= free else -1.0 if n > max_length else (free - n) / cache_length
            for n in completion_lengths]


# ---------------------------------------------------------------------------------------------------
# naming, loading and checking reward functions


@dataclass(frozen=True)
class RewardFunction:
    """A reward function with the name errors and logs use (the config's spec, e.g. "my.py:has_format")."""

    name: str
    fn: Callable[..., Sequence[float | None]]

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> Sequence[float | None]:
        return self.fn(prompts=prompts, completions=completions, **fields)


def as_reward_function(fn: Callable[..., Sequence[float | None]] | RewardFunction) -> RewardFunction:
    """A plain callable (the Python API) as a RewardFunction named after it; a RewardFunction as it is."""
    if isinstance(fn, RewardFunction):
        return fn
    inner = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    return RewardFunction(name=f"{getattr(inner, '__module__', '?')}:{name}", fn=fn)


_SPEC_HELP = "expected 'package.module:function' or 'path/to/file.py:function'"
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def load_reward_function(spec: str, base_dir: str | Path | None = None,
                         kwargs: Mapping[str, Any] | None = None) -> RewardFunction:
    """The function a config names: "package.module:function" or "path/to/file.py:function", a relative
    path taken from `base_dir` (the config file's folder). `kwargs` binds constants to named parameters
    (e.g. {"pattern": "..."} for format_match). Raises RewardError naming the spec on bad syntax, an
    import error (with its message), a missing attribute, something not callable, or an unknown parameter."""
    target, sep, attr = str(spec).strip().rpartition(":")
    if not sep or not target or not _DOTTED.fullmatch(attr):
        raise RewardError(f"reward function {spec!r}: {_SPEC_HELP}")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    if not is_file and not _DOTTED.fullmatch(target):
        raise RewardError(f"reward function {spec!r}: {_SPEC_HELP}")
    module = _import_file(spec, target, base_dir) if is_file else _import_module(spec, target)

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RewardError(f"reward function {spec!r}: {target} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward function {spec!r}: {attr} is a {type(obj).__name__}, not a function")

    fn = RewardFunction(name=str(spec).strip(), fn=obj)
    _check_call_signature(fn)
    if kwargs:
        # a constant must name a parameter of the function: with **kwargs alone a typo would pass unseen
        params = {n: p for n, p in _parameters(fn).items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in CALL_ARGS}
        for key in kwargs:
            if key not in params:
                named = ", ".join(params) or "none"
                raise RewardError(f"reward function {spec!r}: cannot set parameter {key!r} "
                                  f"(its parameters besides prompts and completions: {named})")
        fn = RewardFunction(name=fn.name, fn=functools.partial(obj, **kwargs))
    return fn


def _import_module(spec: str, target: str) -> Any:
    try:
        return importlib.import_module(target)
    except Exception as e:  # any failure while importing user code is the user's to fix
        raise RewardError(f"reward function {spec!r}: cannot import {target}: {type(e).__name__}: {e}") from None


def _import_file(spec: str, target: str, base_dir: str | Path | None) -> Any:
    path = Path(target).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.resolve()
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: no file {path}")
    # one module per file path, registered so that classes and pickling inside the file work
    stem, digest = re.sub(r"\W", "_", path.stem), hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"_minirlhf_reward_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward function {spec!r}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardError(f"reward function {spec!r}: cannot import {path}: {type(e).__name__}: {e}") from None
    return module


def _parameters(fn: RewardFunction) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn.fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume they take anything
        return {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}


def _check_call_signature(fn: RewardFunction) -> None:
    """Every reward function takes `prompts` and `completions` as keywords (or **kwargs)."""
    params = _parameters(fn)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for arg in CALL_ARGS:
        p = params.get(arg)
        if (p is None and not takes_any) or (p is not None and p.kind is p.POSITIONAL_ONLY):
            raise RewardError(f"reward function {fn.name!r} must take the keyword arguments prompts and "
                              f"completions (or **kwargs); its parameters: {', '.join(params) or 'none'}")


def required_fields(fn: Callable[..., Any] | RewardFunction) -> tuple[str, ...]:
    """The fields a reward function cannot run without: its keyword parameters with no default, besides
    prompts and completions, in signature order."""
    params = _parameters(as_reward_function(fn))
    return tuple(name for name, p in params.items()
                 if name not in CALL_ARGS and p.default is p.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_reward_fields(functions: Sequence[Callable[..., Any] | RewardFunction], columns: Sequence[str]) -> None:
    """Before any compute: every function takes prompts and completions, and each field it requires is
    one of the data's `columns` (those of every row, besides the prompt) or a stage field. Raises
    RewardError naming the function and the missing field."""
    available = set(columns) | set(STAGE_FIELDS)
    for f in map(as_reward_function, functions):
        _check_call_signature(f)
        for name in required_fields(f):
            if name not in available:
                have = ", ".join(sorted(columns)) or "none besides the prompt"
                raise RewardError(f"reward function {f.name!r} needs the field {name!r}, which the data rows lack "
                                  f"(their columns: {have}); add it to every row or fix it in the config")


def check_data_fields(functions: Sequence[RewardFunction], examples: Sequence[dict], split: str) -> None:
    """Before any compute: every field a reward function requires is a column of every data row (or a stage
    field, or a constant bound from the config). A column that only some rows have is named with the first
    row without it; the rest is `check_reward_fields` on the columns of every row. examples: encoded rows of
    data.encode_prompt ({"prompt", "fields"}); split names them in the error ("training", "eval")."""
    if not examples:
        return
    columns = set.intersection(*(set(e["fields"]) for e in examples))
    for fn in functions:
        for name in required_fields(fn):
            if name in columns or name in STAGE_FIELDS or all(name not in e["fields"] for e in examples):
                continue
            row = next(i for i, e in enumerate(examples) if name not in e["fields"])
            raise RewardError(f"reward function {fn.name!r} needs the field {name!r}, which {split} row {row + 1} "
                              f"(prompt {_short_prompt(examples[row]['prompt'])!r}) lacks; add it to every row")
    check_reward_fields(functions, sorted(columns))


# ---------------------------------------------------------------------------------------------------
# scoring


def _fields_for(fn: RewardFunction, fields: Mapping[str, Sequence[Any]]) -> dict[str, Sequence[Any]]:
    """The fields `fn` takes; a constant bound from the config wins over a data column of the same name."""
    params = _parameters(fn)
    bound = fn.fn.keywords if isinstance(fn.fn, functools.partial) else {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in fields.items()
            if k not in bound and k not in CALL_ARGS and (takes_any or k in params)}


def _short_prompt(prompt: Any) -> str:
    """A prompt as error messages show it: at most 60 characters."""
    prompt = str(prompt)
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."


def _row_label(i: int, prompts: Sequence[str], rows: Sequence[str] | None) -> str:
    where = rows[i] if rows is not None else f"row {i}"
    return f"{where} (prompt {_short_prompt(prompts[i])!r})"


def _call(fn: RewardFunction, prompts: list[str], completions: list[str], fields: dict[str, Sequence[Any]],
          rows: Sequence[str] | None) -> Sequence[Any]:
    """fn on the whole batch; if it raises, find the first row that fails alone and name it."""
    try:
        return fn(prompts, completions, **fields)
    except Exception as batch_error:
        for i in range(len(completions)):
            try:
                fn(prompts[i: i + 1], completions[i: i + 1], **{k: v[i: i + 1] for k, v in fields.items()})
            except Exception as e:
                raise RewardError(f"reward function {fn.name!r} failed on {_row_label(i, prompts, rows)}: "
                                  f"{type(e).__name__}: {e}") from e
        raise RewardError(f"reward function {fn.name!r} failed on the batch of {len(completions)} completions "
                          f"(on no single one alone): {type(batch_error).__name__}: {batch_error}") from batch_error


def _as_floats(fn: RewardFunction, out: Any, prompts: list[str], rows: Sequence[str] | None) -> list[float]:
    n = len(prompts)
    if isinstance(out, (str, bytes)) or not hasattr(out, "__iter__"):
        raise RewardError(f"reward function {fn.name!r} returned a {type(out).__name__}; expected a list of "
                          f"{n} numbers (or None), one per completion")
    values = list(out.tolist() if torch.is_tensor(out) else out)
    if len(values) != n:
        raise RewardError(f"reward function {fn.name!r} returned {len(values)} rewards for {n} completions; "
                          f"expected exactly one per completion")
    floats = []
    for i, v in enumerate(values):
        if v is None:
            floats.append(math.nan)
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {fn.name!r} returned {v!r} ({type(v).__name__}) for "
                              f"{_row_label(i, prompts, rows)}; expected a number or None") from None
        if not math.isfinite(x):
            raise RewardError(f"reward function {fn.name!r} returned {x} for {_row_label(i, prompts, rows)}; "
                              f"rewards must be finite (return None to skip a completion)")
        floats.append(x)
    return floats


def score_completions(
    functions: Sequence[Callable[..., Any] | RewardFunction],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]] | None = None,
    rows: Sequence[str] | None = None,
) -> torch.Tensor:
    """Every reward function on every completion: rewards [N, F] float32, NaN where a function returned None.

    prompts, completions: N each; fields: name -> N values (data columns and STAGE_FIELDS); rows: optional
    labels for error messages (e.g. "train.jsonl line 17"), N of them. Weights are not applied here: both
    aggregations in losses.grpo_advantages need the per-function scores. Raises RewardError naming the
    function (and row) for an exception, a wrong return length, a non-number, NaN or inf. A completion that
    every function skipped (all None) is logged as a warning, as TRL does, and later gets advantage 0.
    """
    prompts, completions = list(prompts), list(completions)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"rewards.score_completions: {len(prompts)} prompts for {n} completions")
    fields = {k: list(v) for k, v in (fields or {}).items()}
    for k, v in fields.items():
        if len(v) != n:
            raise ValueError(f"rewards.score_completions: field {k!r} has {len(v)} values for {n} completions")
    if rows is not None and len(rows) != n:
        raise ValueError(f"rewards.score_completions: {len(rows)} row labels for {n} completions")
    reward_fns = [as_reward_function(f) for f in functions]
    check_reward_fields(reward_fns, list(fields))

    columns = []
    for fn in reward_fns:
        out = _call(fn, prompts, completions, _fields_for(fn, fields), rows)
        columns.append(_as_floats(fn, out, prompts, rows))
    scores = torch.tensor(columns, dtype=torch.float32).reshape(len(reward_fns), n).T.contiguous()  # [N, F]
    unscored = torch.isnan(scores).all(dim=1) if reward_fns else torch.zeros(n, dtype=torch.bool)
    if bool(unscored.any()):
        first = int(unscored.nonzero()[0])
        logger.warning("%d of %d completions got None from every reward function (first: %s); they get advantage 0",
                       int(unscored.sum()), n, _row_label(first, prompts, rows))
    return scores
