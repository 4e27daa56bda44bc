"""The typed-TOML engine behind config.py: sections as dataclasses, files and `--set` overrides read into
them with type checks, did-you-mean hints, relative paths, and the sections rendered back as TOML.

A section is a dataclass whose fields are made with `setting(default, help, path=...)`; nested dataclass
fields are sub-tables (`[model.init]`). The engine works on a mapping {section name: section object}, so
it knows nothing of which sections a run has (config.py and the stage registry decide that).

    apply_tables(sections, tomllib table, source, base, origins)   a file's tables
    apply_override(sections, "train.lr=1e-4", origins)              one --set argument
    resolve_relative(sections, cwd)                                 paths still relative
    render(sections, comments)                                      TOML text, every key with its help

Loading is strict: an unknown section or key, a value of the wrong TOML type, or a non-finite number is a
`ConfigError` naming the file (or the `--set` argument), the section and the key, with the nearest valid
key suggested (or ours for another trainer's name, such as transformers' `gradient_accumulation_steps`).
The checks of values (`check`, `check_choice`) are here too, for the sections' `validate` methods.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from minirlhf.errors import UserError


class ConfigError(UserError, ValueError):
    """A problem in a config: says which file (or --set argument), [section] and key, and what is wrong."""

    def __init__(self, message: str, section: str | None = None, key: str | None = None):
        super().__init__(message)
        self.section = section
        self.key = key


# `path` of a setting whose values are "file.py:name" or "package.module:name" specs: the file part is a path
PY_SPEC = "file.py:name"


def setting(default: Any, help: str, path: bool | str = False) -> Any:
    """A section field with a default, a one-line help, and whether it holds a filesystem path (True, a
    suffix such as ".jinja" when only values ending in it are paths, or PY_SPEC)."""
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- checks used by validate()

def fail(section: str, key: str, requirement: str, value: Any) -> ConfigError:
    """The error of a value that is not `requirement`: `[section] key must be <requirement>, got <value>`."""
    shown = str(int(value)) if isinstance(value, float) and value.is_integer() else toml_value(value)
    return ConfigError(f"[{section}] {key} must be {requirement}, got {shown}", section, key)


def check(ok: bool, section: str, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise fail(section, key, requirement, value)


def check_choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = suggest(value, choices)
        err = fail(section, key, "one of " + ", ".join(toml_value(c) for c in choices), value)
        raise ConfigError(f"{err}{hint}", section, key)


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or ''.

    difflib's closest match, except that a valid key which the unknown one merely extends by an
    `_suffix` wins (`lr_rate` -> `lr`, `warmup` -> `warmup_steps`): difflib alone would pick
    `min_lr_ratio` for `lr_rate`, which shares more letters but not the meaning.
    """
    valid = list(valid)
    extends = [v for v in valid if name.startswith(v + "_") or v.startswith(name + "_")]
    if extends:
        return f" (did you mean '{max(extends, key=len)}'?)"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# Keys of other trainers (transformers' TrainingArguments, TRL's configs, PEFT) -> where ours live:
# (section, key, the value's form when it differs, a remark; no key: the remark alone). An unknown key
# found here points to ours, whichever section it was given in.
ECOSYSTEM_KEYS: dict[str, tuple[str, str, str, str]] = {
    "learning_rate": ("train", "lr", "", ""),
    "lr_scheduler_type": ("train", "schedule", "", ""),
    "lr_schedule": ("train", "schedule", "", ""),
    "scheduler": ("train", "schedule", "", ""),
    "num_train_epochs": ("train", "epochs", "", ""),
    "warmup_ratio": ("train", "warmup_steps", "", ""),
    "per_device_train_batch_size": ("train", "micro_batch_size", "", ""),
    "per_device_eval_batch_size": ("train", "micro_batch_size", "", ""),
    "batch_size": ("train", "micro_batch_size", "", ""),
    "gradient_accumulation_steps": ("train", "grad_accum", "", ""),
    "adam_beta1": ("train", "betas", "[beta1, beta2]", ""),
    "adam_beta2": ("train", "betas", "[beta1, beta2]", ""),
    "adam_epsilon": ("train", "adam_eps", "", ""),
    "optim": ("train", "", "", "the optimizer is always AdamW, set by [train] betas, adam_eps and weight_decay"),
    "bf16": ("train", "precision", '"bf16"', ""),
    "fp16": ("train", "precision", '"bf16"', "there is no fp16 autocast"),
    "gradient_checkpointing": ("train", "activation_checkpointing", "", ""),
    "logging_steps": ("train", "log_every", "", ""),
    "save_steps": ("train", "save_every", "", ""),
    "eval_steps": ("train", "eval_every", "", ""),
    "save_total_limit": ("train", "keep_last", "", ""),
    "resume_from_checkpoint": ("train", "resume", "", ""),
    "overwrite_output_dir": ("train", "overwrite", "", ""),
    "torch_compile": ("train", "compile", "", ""),
    "max_length": ("data", "cutoff_len", "", ""),
    "max_seq_length": ("data", "cutoff_len", "", ""),
    "max_prompt_length": ("data", "cutoff_len", "", "one limit for prompt and answer, the prompt is cut first"),
    "dataset_text_field": ("data", "text_field", "", ""),
    "dataset_num_proc": ("data", "num_workers", "", ""),
    "dataloader_num_workers": ("data", "num_workers", "", ""),
    "model_name_or_path": ("model", "path", "", ""),
    "torch_dtype": ("model", "dtype", "", ""),
    "use_peft": ("lora", "enabled", "", ""),
    "lora_r": ("lora", "r", "", ""),
    "lora_alpha": ("lora", "alpha", "", ""),
    "lora_dropout": ("lora", "dropout", "", ""),
    "lora_target_modules": ("lora", "target_modules", "", ""),
    "neftune_noise_alpha": ("sft", "neftune_alpha", "", ""),
    "precompute_ref_log_probs": ("dpo", "reference", '"precompute"', ""),
}


def key_hint(name: str, section: str | None, valid: typing.Iterable[str], sections: Mapping[str, type]) -> str:
    """' (did you mean ...?)' for an unknown key `name` in [section] (None: outside any section).

    In order: another trainer's name for one of our keys (ECOSYSTEM_KEYS: `lr_schedule` -> `schedule`,
    `adam_beta2` -> `betas`, where spelling alone would suggest `lr` and `adam_eps`), the same key in
    another of `sections` (name -> section type), then the nearest key of this section (`suggest`). A key
    of another section is named with its section: (did you mean [data] cutoff_len?).
    """
    if name in ECOSYSTEM_KEYS:
        where, key, value, remark = ECOSYSTEM_KEYS[name]
        if not key:
            return f" ({remark})"
        shown = (f"'{key}'" if not value else key) if where == section else f"[{where}] {key}"
        if value:
            shown += f" = {value}"
        return f" ({remark}; did you mean {shown}?)" if remark else f" (did you mean {shown}?)"
    owners = [s for s, keys in section_keys(sections) if s != section and name in keys]
    if owners:
        return " (did you mean " + " or ".join(f"[{s}] {name}" for s in owners) + "?)"
    return suggest(name, valid) if section is not None else ""


def section_keys(sections: Mapping[str, type]) -> list[tuple[str, list[str]]]:
    """(section name, its keys) for every section and sub-table, [model.init] included."""
    out = []

    def walk(cls: type, name: str) -> None:
        types_ = field_types(cls)
        out.append((name, [k for k, t in types_.items() if not dataclasses.is_dataclass(t)]))
        for k, t in types_.items():
            if dataclasses.is_dataclass(t):
                walk(t, f"{name}.{k}")

    for name, cls in sections.items():
        walk(cls, name)
    return out


def suggest_section(name: str, sections: typing.Iterable[str]) -> str:
    """' (did you mean [x]?)' for the nearest section name, or ''."""
    hint = suggest(name, sections)
    return hint.replace("'", "[", 1).replace("'", "]", 1) if hint else ""


# ----------------------------------------------------------------------------- types of values

def toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # TOML dates and times


def _type_name(tp: Any) -> str:
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return "an array of " + {str: "strings", float: "numbers", int: "integers"}[inner]
    if tp is dict or typing.get_origin(tp) is dict:
        return "a table"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    raise TypeError(f"minirlhf/toml_fields.py: no TOML rule for field type {tp!r}")


def _convert(value: Any, tp: Any) -> Any:
    """`value` as field type `tp` (an integer is accepted for a float), or raise TypeError."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if typing.get_origin(tp) is list and isinstance(value, list):
        inner = typing.get_args(tp)[0]
        return [_convert(v, inner) for v in value]
    if (tp is dict or typing.get_origin(tp) is dict) and isinstance(value, dict):
        inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: v if inner is Any else _convert(v, inner) for k, v in value.items()}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option)
            except TypeError:
                pass
    raise TypeError(_type_name(tp))


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------- reading values in

def read_toml(path: str | os.PathLike) -> tuple[dict[str, Any], str, Path]:
    """A config file's top-level table, its name for messages, and the folder its relative paths resolve
    against. A missing file or invalid TOML is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file.resolve()}")
    try:
        raw = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return raw, str(path), file.resolve().parent


def apply_tables(sections: Mapping[str, Any], raw: Mapping[str, Any], source: str, base: Path,
                 origins: dict) -> None:
    """Set every `[section] key = value` of a file's top-level table `raw` on `sections` (name -> section
    object); origins records (section, key) -> source for each value set."""
    types_ = {name: type(obj) for name, obj in sections.items()}
    for name, table in raw.items():
        if name not in sections:
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: key '{name}' must be inside a section{key_hint(name, None, (), types_)}")
            raise ConfigError(f"{source}: unknown section [{name}]{suggest_section(name, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {toml_type(table)} {toml_value(table)}")
        _apply_table(sections[name], name, table, source, base, origins, types_)


def _apply_table(obj: Any, section: str, table: dict, source: str, base: Path | None, origins: dict,
                 all_types: Mapping[str, type]) -> None:
    """Type-check and set each `key = value` of one TOML table on the section dataclass `obj`."""
    types_ = field_types(type(obj))
    for key, value in table.items():
        if key not in types_:
            raise ConfigError(f"{source}: [{section}] unknown key '{key}'{key_hint(key, section, types_, all_types)}",
                              section, key)
        _set_field(obj, section, key, value, types_[key], source, base, origins, all_types)


def _set_field(obj: Any, section: str, key: str, value: Any, tp: Any, source: str, base: Path | None,
               origins: dict, all_types: Mapping[str, type]) -> None:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}.{key}] must be a table, got {toml_type(value)} "
                              f"{toml_value(value)}", section, key)
        _apply_table(getattr(obj, key), f"{section}.{key}", value, source, base, origins, all_types)
        return
    try:
        value = _convert(value, tp)
    except TypeError as e:
        raise ConfigError(f"{source}: [{section}] {key} must be {e}, got {toml_type(value)} "
                          f"{toml_value(value)}", section, key) from None
    numbers = value if isinstance(value, list) else [value]
    if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):  # TOML reads inf and nan
        finite = "finite numbers" if isinstance(value, list) else "a finite number"
        raise ConfigError(f"[{section}] {key} must be {finite}, got {toml_value(value)} ({source})", section, key)
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}[key]
    if meta.get("path") and base is not None:
        value = _resolve_field(value, base, meta["path"])
    setattr(obj, key, value)
    origins[(section, key)] = source


def apply_override(sections: Mapping[str, Any], item: str, origins: dict) -> None:
    """One `--set section.key=value` (or `section.table.key=value`): the value is parsed with TOML rules
    (`1e-4` is a float, `true` a boolean, `["q_proj"]` an array) and, when it is not a TOML value, taken
    as a bare string (`model.path=/data/m`); a relative path resolves against the current directory."""
    where = f"--set {item}"
    types_ = {name: type(obj) for name, obj in sections.items()}
    key_path, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"{where}: expected section.key=value")
    parts = key_path.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"{where}: expected section.key=value, got key '{key_path.strip()}'"
                          f"{key_hint(key_path.strip(), None, (), types_)}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    name, *inner, key = parts
    if name not in sections:
        raise ConfigError(f"{where}: unknown section [{name}]{suggest_section(name, sections)}")
    obj, section = sections[name], name
    for sub in inner:
        fields_ = field_types(type(obj))
        if sub not in fields_ or not dataclasses.is_dataclass(fields_[sub]):
            tables = [k for k, t in fields_.items() if dataclasses.is_dataclass(t)]
            raise ConfigError(f"{where}: [{section}] has no table '{sub}'{suggest(sub, tables)}")
        obj, section = getattr(obj, sub), f"{section}.{sub}"
    fields_ = field_types(type(obj))
    if key not in fields_:
        raise ConfigError(f"{where}: [{section}] unknown key '{key}'{key_hint(key, section, fields_, types_)}",
                          section, key)
    _set_field(obj, section, key, value, fields_[key], where, Path.cwd(), origins, types_)


def _resolve(value: str, base: Path, suffix: bool | str = True) -> str:
    """A relative path made absolute against `base`; '', 'auto', inline Jinja ('{' in it) and, for a field
    whose paths end in `suffix`, values that do not (chat template names) stay as they are."""
    if not value or value == "auto" or "{" in value or os.path.isabs(value):
        return value
    if suffix == PY_SPEC:
        target, sep, name = value.rpartition(":")
        return _resolve(target, base) + sep + name if sep and target.endswith(".py") else value
    if isinstance(suffix, str) and not value.endswith(suffix):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _resolve_field(value: str | list[str], base: Path, suffix: bool | str) -> str | list[str]:
    return [_resolve(v, base, suffix) for v in value] if isinstance(value, list) else _resolve(value, base, suffix)


def resolve_relative(sections: Mapping[str, Any], cwd: Path) -> None:
    """Make the paths still relative (defaults such as output_dir) absolute against `cwd`, so that a saved
    config means the same thing wherever it is read from."""

    def walk(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            elif f.metadata.get("path"):
                setattr(obj, f.name, _resolve_field(value, cwd, f.metadata["path"]))

    for obj in sections.values():
        walk(obj)


# ----------------------------------------------------------------------------- rendering

def toml_value(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, its keys quoted
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _render_section(obj: Any, name: str, comments: bool, lines: list[str]) -> None:
    lines.append(f"[{name}]")
    tables = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((value, f"{name}.{f.name}"))
            continue
        if comments:
            lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {toml_value(value)}")
    lines.append("")
    for value, sub in tables:
        _render_section(value, sub, comments, lines)


def render(sections: Mapping[str, Any], comments: bool = True) -> list[str]:
    """Every section with every key, in order, each key preceded by its help line when `comments`."""
    lines: list[str] = []
    for name, obj in sections.items():
        _render_section(obj, name, comments, lines)
    return lines


def iter_fields(sections: Mapping[str, type]) -> Iterator[tuple[str, str, str, str, str]]:
    """(section, key, type, default as TOML, help) for every field of `sections` (name -> section type), for
    documentation tables."""

    def walk(cls: type, section: str) -> Iterator[tuple[str, str, str, str, str]]:
        obj = cls()
        for name, tp in field_types(cls).items():
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{section}.{name}")
                continue
            help_ = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]["help"]
            yield section, name, _type_name(tp), toml_value(getattr(obj, name)), help_

    for section, cls in sections.items():
        yield from walk(cls, section)
