"""Run configuration: TOML files read into one dataclass per section, `--set` overrides, validation.

A config file has one table per concern and one per stage:

    stage = "dpo"                     # optional; must agree with `--stage` when both are given
    [model]   path, tokenizer, dtype, backend, and [model.init] for a fresh tiny model
    [data]    files, format, field names, cutoff_len, block_size, eval split, seed ...
    [train]   optimizer, schedule, batch sizes, precision, checkpoints, logging
    [lora]    LoRA adapters
    [pt] [sft] [rm] [dpo] [kto] [ppo]   stage hyperparameters

Every field has a default and a one-line `help` in its metadata; `default_toml()` renders them all as a
commented TOML file and `iter_fields()` yields rows for documentation tables. Loading is strict: an
unknown section or key, a value of the wrong TOML type, or a value out of range is a `ConfigError` that
names the file (or the `--set` argument), the section and the key, and suggests the nearest valid key
(or ours for another trainer's name, such as transformers' `gradient_accumulation_steps`).
Relative paths in a file resolve against that file's folder; relative paths in `--set`, and relative
defaults such as `runs/out`, against the current directory, so a loaded Config holds absolute paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from minirlhf.errors import UserError

STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")

# data formats each stage can read ("auto" picks the stage's natural format, see minirlhf/data.py)
STAGE_FORMATS = {
    "pt": ("auto", "text"),
    "sft": ("auto", "alpaca", "sharegpt"),
    "rm": ("auto", "preference"),
    "dpo": ("auto", "preference"),
    "kto": ("auto", "kto"),
    "ppo": ("auto", "prompt"),
}

# the projection names of minirlhf.model.Transformer that LoRA may wrap
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class ConfigError(UserError, ValueError):
    """A problem in a config: says which file (or --set argument), [section] and key, and what is wrong."""

    def __init__(self, message: str, section: str | None = None, key: str | None = None):
        super().__init__(message)
        self.section = section
        self.key = key


def _f(default: Any, help: str, path: bool | str = False) -> Any:
    """A dataclass field with a default, a one-line help, and whether it holds a filesystem path (True, or
    a suffix such as ".jinja" when only values ending in it are paths)."""
    meta = {"help": help, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- checks used by validate()

def _fail(section: str, key: str, requirement: str, value: Any) -> ConfigError:
    shown = str(int(value)) if isinstance(value, float) and value.is_integer() else _toml_value(value)
    return ConfigError(f"[{section}] {key} must be {requirement}, got {shown}", section, key)


def _check(ok: bool, section: str, key: str, requirement: str, value: Any) -> None:
    if not ok:
        raise _fail(section, key, requirement, value)


def _check_choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = _suggest(value, choices)
        err = _fail(section, key, "one of " + ", ".join(_toml_value(c) for c in choices), value)
        raise ConfigError(f"{err}{hint}", section, key)


def _suggest(name: str, valid: typing.Iterable[str]) -> str:
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


def _key_hint(name: str, section: str | None, valid: typing.Iterable[str]) -> str:
    """' (did you mean ...?)' for an unknown key `name` in [section] (None: outside any section).

    In order: another trainer's name for one of our keys (ECOSYSTEM_KEYS: `lr_schedule` -> `schedule`,
    `adam_beta2` -> `betas`, where spelling alone would suggest `lr` and `adam_eps`), the same key in
    another section, then the nearest key of this section (`_suggest`). A key of another section is
    named with its section: (did you mean [data] cutoff_len?).
    """
    if name in ECOSYSTEM_KEYS:
        where, key, value, remark = ECOSYSTEM_KEYS[name]
        if not key:
            return f" ({remark})"
        shown = (f"'{key}'" if not value else key) if where == section else f"[{where}] {key}"
        if value:
            shown += f" = {value}"
        return f" ({remark}; did you mean {shown}?)" if remark else f" (did you mean {shown}?)"
    owners = [s for s, keys in _section_keys() if s != section and name in keys]
    if owners:
        return " (did you mean " + " or ".join(f"[{s}] {name}" for s in owners) + "?)"
    return _suggest(name, valid) if section is not None else ""


def _section_keys() -> list[tuple[str, list[str]]]:
    """(section name, its keys) for every section and sub-table, [model.init] included."""
    out = []

    def walk(cls: type, name: str) -> None:
        types_ = _field_types(cls)
        out.append((name, [k for k, t in types_.items() if not dataclasses.is_dataclass(t)]))
        for k, t in types_.items():
            if dataclasses.is_dataclass(t):
                walk(t, f"{name}.{k}")

    for name, cls in SECTION_TYPES.items():
        walk(cls, name)
    return out


# ----------------------------------------------------------------------------- sections

@dataclass
class ModelInit:
    """Shape of a fresh, randomly initialised model (used when [model] path is empty).

    The vocabulary size and special token ids come from the tokenizer.
    """

    section = "model.init"
    model_type: str = _f("llama", "architecture family: llama | mistral | qwen2 | gpt2")
    hidden_size: int = _f(64, "width of the residual stream")
    intermediate_size: int = _f(176, "width of the MLP's hidden layer")
    num_hidden_layers: int = _f(2, "number of transformer blocks")
    num_attention_heads: int = _f(4, "query heads per block")
    num_key_value_heads: int = _f(2, "key/value heads per block (grouped-query attention; = heads for MHA)")
    max_position_embeddings: int = _f(512, "longest sequence the positions support")
    rope_theta: float = _f(10000.0, "RoPE base frequency (llama family)")
    tie_word_embeddings: bool = _f(False, "share the input embedding with the LM head (always on for gpt2)")

    def validate(self) -> None:
        s = self.section
        _check_choice(s, "model_type", self.model_type, ("llama", "mistral", "qwen2", "gpt2"))
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            _check(getattr(self, key) >= 1, s, key, ">= 1", getattr(self, key))
        _check(self.rope_theta > 0, s, "rope_theta", "> 0", self.rope_theta)
        _check(self.hidden_size % self.num_attention_heads == 0, s, "hidden_size",
               f"a multiple of num_attention_heads = {self.num_attention_heads}", self.hidden_size)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, s, "num_key_value_heads",
               f"a divisor of num_attention_heads = {self.num_attention_heads}", self.num_key_value_heads)


@dataclass
class ModelSection:
    section = "model"
    path: str = _f("", "HF-format model directory to start from; empty = a fresh model built from [model.init]",
                   path=True)
    tokenizer: str = _f("", "tokenizer directory; empty = the model path", path=True)
    dtype: str = _f("auto", "weight dtype when loading: auto (checkpoint's) | float32 | bfloat16 | float16")
    backend: str = _f("auto", "attention and fused-loss kernels: auto (Triton on CUDA) | triton | torch")
    init: ModelInit = field(default_factory=ModelInit, metadata={"help": "fresh model shape", "path": False})

    def validate(self) -> None:
        _check_choice("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("model", "backend", self.backend, ("auto", "triton", "torch"))
        self.init.validate()

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer directory: `tokenizer`, else the model `path`."""
        return self.tokenizer or self.path


@dataclass
class DataSection:
    section = "data"
    train_files: list[str] = _f([], "training files: .jsonl, .json (an array of objects) or .txt (pt only)",
                                path=True)
    eval_files: list[str] = _f([], "evaluation files; empty = hold out eval_split of the training rows",
                               path=True)
    format: str = _f("auto", "auto (the stage's format; sft detects alpaca/sharegpt per row) | text | alpaca "
                             "| sharegpt | preference | kto | prompt")
    text_field: str = _f("text", "pt: column holding a document (jsonl)")
    instruction_field: str = _f("instruction", "alpaca: column holding the instruction")
    input_field: str = _f("input", "alpaca: optional column appended to the instruction after a blank line")
    output_field: str = _f("output", "alpaca: column holding the answer")
    system_field: str = _f("system", "optional column holding a system prompt (alpaca, sharegpt, preference)")
    messages_field: str = _f("", "sharegpt: column holding the turns; empty = 'conversations' or 'messages'")
    prompt_field: str = _f("prompt", "preference/kto/prompt: column holding the prompt ('query' also accepted)")
    chosen_field: str = _f("chosen", "preference: column holding the preferred answer")
    rejected_field: str = _f("rejected", "preference: column holding the dispreferred answer")
    completion_field: str = _f("completion", "kto: column holding the answer")
    label_field: str = _f("label", "kto: column holding true (desirable) / false (undesirable)")
    cutoff_len: int = _f(1024, "longest tokenized example; the prompt loses its oldest tokens first")
    block_size: int = _f(1024, "pt (and sft packing): tokens per packed block")
    eval_split: float = _f(0.0, "fraction of training rows held out for evaluation (when no eval_files)")
    seed: int = _f(42, "seed of the eval split and of the per-epoch shuffle")
    shuffle: bool = _f(True, "reshuffle the training examples every epoch")
    skip_bad_rows: bool = _f(False, "skip malformed rows (and report how many) instead of stopping")
    chat_template: str = _f("", "override the tokenizer's chat template: a built-in name (chatml, llama2, llama3, "
                                "alpaca, vicuna, plain), a .jinja file, or Jinja source", path=".jinja")
    num_workers: int = _f(0, "processes used to tokenize (0 = this process)")

    def validate(self) -> None:
        s = self.section
        _check_choice(s, "format", self.format,
                      ("auto", "text", "alpaca", "sharegpt", "preference", "kto", "prompt"))
        for key in ("text_field", "instruction_field", "input_field", "output_field", "system_field",
                    "prompt_field", "chosen_field", "rejected_field", "completion_field", "label_field"):
            _check(bool(getattr(self, key)), s, key, "a non-empty column name", getattr(self, key))
        _check(self.cutoff_len >= 2, s, "cutoff_len", ">= 2", self.cutoff_len)
        _check(self.block_size >= 2, s, "block_size", ">= 2", self.block_size)
        _check(0.0 <= self.eval_split < 1.0, s, "eval_split", "in [0, 1)", self.eval_split)
        _check(self.num_workers >= 0, s, "num_workers", ">= 0", self.num_workers)
        if self.eval_files and self.eval_split > 0:
            raise ConfigError(f"[{s}] eval_split must be 0 when eval_files are given, got "
                              f"{_toml_value(self.eval_split)}", s, "eval_split")


@dataclass
class TrainSection:
    section = "train"
    output_dir: str = _f("runs/out", "where checkpoints, metrics.jsonl and config.toml are written", path=True)
    seed: int = _f(42, "seed of model init, dropout and sampling")
    lr: float = _f(1e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine and linear schedules)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (not applied to norms, biases, embeddings)")
    betas: list[float] = _f([0.9, 0.95], "AdamW (beta1, beta2)")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "optimizer steps of linear warmup from 0 to lr")
    schedule: str = _f("cosine", "learning-rate decay after warmup: cosine | linear | constant")
    max_steps: int = _f(0, "optimizer steps to run; 0 = run `epochs` epochs")
    epochs: int = _f(1, "passes over the training data (when max_steps = 0)")
    micro_batch_size: int = _f(4, "examples per forward/backward")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping")
    precision: str = _f("auto", "auto (bf16 autocast where supported, else fp32) | fp32 | bf16")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in backward")
    disable_dropout: bool = _f(True, "ppo, dpo, kto: set every dropout ([lora] dropout included) of the policy, "
                                     "critic and reference to 0, as TRL does (their ratios and log-ratios compare "
                                     "the model with itself or a reference); pt, sft, rm keep dropout")
    fsdp_cpu_offload: bool = _f(False, "under torchrun: keep FSDP's sharded weights, gradients and optimizer "
                                       "states in host memory (slower, for models that do not fit)")
    fsdp_reshard_after_forward: bool = _f(True, "under torchrun: free each block's gathered weights after its "
                                                "forward and gather again in backward (ZeRO-3); false keeps "
                                                "them (ZeRO-2: faster, more memory)")
    compile: bool = _f(False, "torch.compile the model")
    eval_every: int = _f(0, "optimizer steps between evaluations; 0 = only at the end")
    save_every: int = _f(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep_last: int = _f(2, "intermediate checkpoints kept on disk")
    log_every: int = _f(10, "optimizer steps between metric lines")
    resume: str = _f("", "'' = start fresh, 'auto' = latest checkpoint in output_dir, or a checkpoint path",
                     path=True)
    overwrite: bool = _f(False, "start afresh in an output_dir holding an earlier run, deleting that run's files "
                                "(never files minirlhf did not write)")
    threads: int = _f(0, "CPU threads of torch's kernels (torch.set_num_threads); 0 = torch's default, which "
                         "follows OMP_NUM_THREADS")

    def validate(self) -> None:
        s = self.section
        for key in ("lr", "min_lr_ratio", "weight_decay", "adam_eps", "max_grad_norm"):
            _check(math.isfinite(getattr(self, key)), s, key, "a finite number", getattr(self, key))
        _check(self.lr > 0, s, "lr", "> 0", self.lr)
        _check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.weight_decay >= 0, s, "weight_decay", ">= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), s, "betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.adam_eps > 0, s, "adam_eps", "> 0", self.adam_eps)
        _check(self.warmup_steps >= 0, s, "warmup_steps", ">= 0", self.warmup_steps)
        _check_choice(s, "schedule", self.schedule, ("cosine", "linear", "constant"))
        _check(self.max_steps >= 0, s, "max_steps", ">= 0", self.max_steps)
        _check(self.max_steps > 0 or self.epochs >= 1, s, "epochs", ">= 1 when max_steps = 0", self.epochs)
        _check(self.micro_batch_size >= 1, s, "micro_batch_size", ">= 1", self.micro_batch_size)
        _check(self.grad_accum >= 1, s, "grad_accum", ">= 1", self.grad_accum)
        _check(self.max_grad_norm >= 0, s, "max_grad_norm", ">= 0", self.max_grad_norm)
        _check_choice(s, "precision", self.precision, ("auto", "fp32", "bf16"))
        for key in ("eval_every", "save_every"):
            _check(getattr(self, key) >= 0, s, key, ">= 0", getattr(self, key))
        _check(self.keep_last >= 1, s, "keep_last", ">= 1", self.keep_last)
        _check(self.log_every >= 1, s, "log_every", ">= 1", self.log_every)
        _check(self.threads >= 0, s, "threads", ">= 0", self.threads)
        if self.overwrite and self.resume:
            raise ConfigError(f"[{s}] overwrite must be false when resuming (it starts afresh), got true with "
                              f"resume = {_toml_value(self.resume)}", s, "overwrite")
        _check(bool(self.output_dir), s, "output_dir", "a directory path", self.output_dir)


@dataclass
class LoraSection:
    section = "lora"
    enabled: bool = _f(False, "train low-rank adapters instead of all weights (Hu et al. 2021)")
    r: int = _f(8, "adapter rank")
    alpha: float = _f(16.0, "scale numerator: the update is (alpha / r) * B A, or alpha / sqrt(r) with rslora")
    dropout: float = _f(0.0, "dropout on the adapter input")
    rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)")
    target_modules: str | list[str] = _f("all-linear", "'all-linear' (every projection except lm_head) or a "
                                                       "list of names such as ['q_proj', 'v_proj']")
    modules_to_save: list[str] = _f([], "modules trained in full and saved with the adapter (e.g. ['lm_head'])")

    def validate(self) -> None:
        s = self.section
        _check(self.r >= 1, s, "r", ">= 1", self.r)
        _check(self.alpha > 0, s, "alpha", "> 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, s, "dropout", "in [0, 1)", self.dropout)
        if isinstance(self.target_modules, str):
            _check(self.target_modules == "all-linear", s, "target_modules",
                   "'all-linear' or a list of module names", self.target_modules)
        else:
            _check(len(self.target_modules) > 0, s, "target_modules", "a non-empty list", self.target_modules)
            for name in self.target_modules:
                if name not in LORA_MODULES:
                    raise ConfigError(f"[{s}] target_modules has unknown module {_toml_value(name)}"
                                      f"{_suggest(name, LORA_MODULES)}; known: {', '.join(LORA_MODULES)}",
                                      s, "target_modules")
        for name in self.modules_to_save:
            _check(bool(name), s, "modules_to_save", "a list of module names", self.modules_to_save)


@dataclass
class PTSection:
    section = "pt"
    add_bos: bool = _f(False, "start every document with the tokenizer's BOS token (when it has one)")

    def validate(self) -> None:
        pass  # a single boolean: the type check in load_config is the whole validation


@dataclass
class SFTSection:
    section = "sft"
    neftune_alpha: float = _f(0.0, "NEFTune noise scale alpha (Jain et al. 2023, Alg. 1); 0 = off")
    packing: bool = _f(False, "pack several examples into each block_size row (no attention across them)")

    def validate(self) -> None:
        _check(self.neftune_alpha >= 0, self.section, "neftune_alpha", ">= 0", self.neftune_alpha)


@dataclass
class RMSection:
    section = "rm"
    loss: str = _f("log_sig", "pairwise loss: log_sig = -log sigmoid(r_c - r_r - m) (InstructGPT eq. 1), "
                              "log_exp = log(1 + exp(r_r - r_c + m))")
    margin_field: str = _f("", "column with a per-pair margin m (Llama 2 eq. 2); empty = no margin")
    center_rewards_coef: float = _f(0.0, "weight of the (r_c + r_r)^2 penalty keeping rewards centred "
                                         "(Eisenstein et al. 2023); 0 = off")

    def validate(self) -> None:
        _check_choice(self.section, "loss", self.loss, ("log_sig", "log_exp"))
        _check(self.center_rewards_coef >= 0, self.section, "center_rewards_coef", ">= 0",
               self.center_rewards_coef)


@dataclass
class DPOSection:
    section = "dpo"
    loss_type: str = _f("sigmoid", "sigmoid (DPO) | hinge (SLiC) | ipo | simpo | orpo")
    beta: float = _f(0.1, "inverse temperature of the implicit reward (orpo: weight lambda of the odds-ratio term)")
    label_smoothing: float = _f(0.0, "conservative DPO: assumed probability that a label is flipped "
                                     "(sigmoid only)")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma (Meng et al. 2024, eq. 6)")
    reference: str = _f("precompute", "reference log-probs: precompute (one pass before training) | live")
    ref_model: str = _f("", "reference model directory; empty = the starting model ([model] path)", path=True)

    def validate(self) -> None:
        s = self.section
        _check_choice(s, "loss_type", self.loss_type, ("sigmoid", "hinge", "ipo", "simpo", "orpo"))
        _check(self.beta > 0, s, "beta", "> 0", self.beta)
        _check(0.0 <= self.label_smoothing < 0.5, s, "label_smoothing", "in [0, 0.5)", self.label_smoothing)
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(f"[{s}] label_smoothing must be 0 unless loss_type = \"sigmoid\", got "
                              f"{_toml_value(self.label_smoothing)} with loss_type = "
                              f"{_toml_value(self.loss_type)}", s, "label_smoothing")
        _check(self.simpo_gamma >= 0, s, "simpo_gamma", ">= 0", self.simpo_gamma)
        _check_choice(s, "reference", self.reference, ("precompute", "live"))


@dataclass
class KTOSection:
    section = "kto"
    beta: float = _f(0.1, "inverse temperature of the implicit reward (Ethayarajh et al. 2024, eq. 8)")
    desirable_weight: float = _f(1.0, "lambda_D, weight of desirable examples")
    undesirable_weight: float = _f(1.0, "lambda_U, weight of undesirable examples")
    ref_model: str = _f("", "reference model directory; empty = the starting model ([model] path)", path=True)

    def validate(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            _check(getattr(self, key) > 0, self.section, key, "> 0", getattr(self, key))


@dataclass
class PPOSection:
    section = "ppo"
    reward_model: str = _f("", "reward model directory (output of the rm stage); required", path=True)
    critic_model: str = _f("", "critic initialisation; empty = the reward model", path=True)
    ref_model: str = _f("", "reference policy for the KL penalty; empty = the starting model", path=True)
    prompts_per_rollout: int = _f(64, "prompts sampled per rollout")
    samples_per_prompt: int = _f(1, "completions generated per prompt")
    minibatch_size: int = _f(16, "rollout sequences per optimizer step")
    micro_batch_size: int = _f(4, "sequences per forward/backward (train.micro_batch_size is not used by ppo)")
    ppo_epochs: int = _f(1, "passes over each rollout")
    clip_eps: float = _f(0.2, "policy ratio clip epsilon (Schulman et al. 2017, eq. 7)")
    value_clip_eps: float = _f(0.2, "value clip range around the rollout values; 0 = no value clipping")
    gamma: float = _f(1.0, "discount factor")
    lam: float = _f(0.95, "GAE lambda (Schulman et al. 2016, eq. 16)")
    kl_coef: float = _f(0.05, "initial KL penalty coefficient beta (Ziegler et al. 2019, eq. 2)")
    adaptive_kl: bool = _f(False, "adapt kl_coef towards target_kl (Ziegler et al. 2019, sec. 2.2)")
    target_kl: float = _f(6.0, "adaptive KL target (nats per sequence)")
    kl_horizon: int = _f(10000, "adaptive KL horizon K_beta (in sequences)")
    kl_estimator: str = _f("k1", "per-token KL estimate: k1 = log p - log q | k3 = (r - 1) - log r (Schulman 2020)")
    whiten_advantages: bool = _f(True, "estimator gae: normalise advantages to zero mean, unit variance over the "
                                       "rollout's answer tokens (grpo and rloo are never re-whitened)")
    reward_norm: str | bool = _f("none", "normalise scores before the KL penalty: none | running (mean/std of "
                                         "every score so far) | rm (the reward model's training-set mean/std "
                                         "saved by the rm stage); older configs' true / false mean running / none")
    reward_clip: float = _f(0.0, "clip scores to [-reward_clip, reward_clip]; 0 = off")
    ptx_coef: float = _f(0.0, "weight of the pretraining loss mixed into the policy loss (InstructGPT eq. 2)")
    ptx_files: list[str] = _f([], "pretraining text for ptx_coef > 0 (same formats as pt)", path=True)
    max_new_tokens: int = _f(128, "longest generated answer")
    temperature: float = _f(1.0, "sampling temperature of rollouts")
    top_k: int = _f(0, "sample from the k most likely tokens; 0 = off")
    top_p: float = _f(1.0, "nucleus sampling mass; 1 = off")
    missing_eos_penalty: float = _f(0.0, "subtracted from the score of answers that never emit EOS")
    early_stop_kl: float = _f(0.0, "stop the PPO epochs of a rollout once its mean KL passes this; 0 = off")
    vf_coef: float = _f(0.1, "weight of the value loss")
    critic_lr: float = _f(0.0, "critic learning rate; 0 = train.lr")
    log_samples_every: int = _f(10, "rollouts between logged sample generations; 0 = never")
    estimator: str = _f("gae", "advantages: gae (with the critic) | grpo (group-normalised, Shao et al. 2024) | "
                               "rloo (leave-one-out, Ahmadian et al. 2024); the last two need no critic")
    reward_dtype: str = _f("auto", "dtype of the frozen reward model: auto ([model] dtype) | float32 | bfloat16 "
                                   "| float16")

    def validate(self) -> None:
        s = self.section
        for key in ("prompts_per_rollout", "samples_per_prompt", "minibatch_size", "micro_batch_size",
                    "ppo_epochs", "max_new_tokens", "kl_horizon"):
            _check(getattr(self, key) >= 1, s, key, ">= 1", getattr(self, key))
        for key in ("value_clip_eps", "kl_coef", "reward_clip", "ptx_coef", "missing_eos_penalty",
                    "early_stop_kl", "vf_coef", "critic_lr"):
            _check(getattr(self, key) >= 0, s, key, ">= 0", getattr(self, key))
        _check(self.clip_eps > 0, s, "clip_eps", "> 0", self.clip_eps)
        _check(0.0 <= self.gamma <= 1.0, s, "gamma", "in [0, 1]", self.gamma)
        _check(0.0 <= self.lam <= 1.0, s, "lam", "in [0, 1]", self.lam)
        _check(self.target_kl > 0, s, "target_kl", "> 0", self.target_kl)
        _check_choice(s, "kl_estimator", self.kl_estimator, ("k1", "k3"))
        if isinstance(self.reward_norm, bool):  # configs written before "rm" existed: true = running
            self.reward_norm = "running" if self.reward_norm else "none"
        _check_choice(s, "reward_norm", self.reward_norm, ("none", "running", "rm"))
        _check(self.temperature > 0, s, "temperature", "> 0 (rollout log-probs need a proper distribution)",
               self.temperature)
        _check(self.top_k >= 0, s, "top_k", ">= 0", self.top_k)
        _check(0.0 < self.top_p <= 1.0, s, "top_p", "in (0, 1]", self.top_p)
        _check(self.log_samples_every >= 0, s, "log_samples_every", ">= 0", self.log_samples_every)
        _check_choice(s, "estimator", self.estimator, ("gae", "grpo", "rloo"))
        _check_choice(s, "reward_dtype", self.reward_dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ConfigError(f"[{s}] samples_per_prompt must be >= 2 for estimator = "
                              f"{_toml_value(self.estimator)} (it compares samples of one prompt), got "
                              f"{self.samples_per_prompt}", s, "samples_per_prompt")
        # rollout -> minibatches (one optimizer step each) -> micro-batches (one forward/backward each)
        rollout = self.prompts_per_rollout * self.samples_per_prompt
        if rollout % self.minibatch_size:
            raise ConfigError(
                f"[{s}] minibatch_size must divide prompts_per_rollout * samples_per_prompt = "
                f"{self.prompts_per_rollout} * {self.samples_per_prompt} = {rollout}, got {self.minibatch_size}",
                s, "minibatch_size")
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(f"[{s}] micro_batch_size must divide minibatch_size = {self.minibatch_size}, "
                              f"got {self.micro_batch_size}", s, "micro_batch_size")


SECTION_TYPES = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "lora": LoraSection,
    "pt": PTSection, "sft": SFTSection, "rm": RMSection, "dpo": DPOSection, "kto": KTOSection,
    "ppo": PPOSection,
}


@dataclass
class Config:
    """A whole run's settings: `stage` plus one attribute per section (`cfg.train.lr`)."""

    stage: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    pt: PTSection = field(default_factory=PTSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    kto: KTOSection = field(default_factory=KTOSection)
    ppo: PPOSection = field(default_factory=PPOSection)

    def validate(self) -> None:
        """Each section's own checks, then the ones that involve the stage or several sections."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {_toml_value(self.stage)}"
                              f"{_suggest(self.stage, STAGES)}", None, "stage")
        for name in SECTION_TYPES:
            getattr(self, name).validate()
        if not self.model.path and not self.model.tokenizer:
            raise ConfigError("[model] tokenizer must be set when path is empty (a fresh model takes its "
                              "vocabulary from the tokenizer), got \"\"", "model", "tokenizer")
        if not self.data.train_files:
            raise ConfigError("[data] train_files must list at least one file, got []", "data", "train_files")
        allowed = STAGE_FORMATS[self.stage]
        if self.data.format not in allowed:
            raise ConfigError(f"[data] format must be one of {', '.join(map(_toml_value, allowed))} for stage "
                              f"{self.stage}, got {_toml_value(self.data.format)}", "data", "format")
        if self.stage == "ppo" and not self.ppo.reward_model:
            raise ConfigError("[ppo] reward_model must be set for stage ppo, got \"\"", "ppo", "reward_model")
        if self.stage == "ppo" and self.ppo.ptx_coef > 0 and not self.ppo.ptx_files:
            raise ConfigError(f"[ppo] ptx_files must list pretraining files when ptx_coef > 0, got [] "
                              f"(ptx_coef = {_toml_value(self.ppo.ptx_coef)})", "ppo", "ptx_files")
        if self.stage == "sft" and self.sft.packing and self.data.cutoff_len > self.data.block_size:
            raise ConfigError(f"[data] cutoff_len must be <= block_size = {self.data.block_size} when "
                              f"[sft] packing = true, got {self.data.cutoff_len}", "data", "cutoff_len")

    @property
    def stage_section(self) -> Any:
        """The section of this run's stage (`cfg.dpo` for stage dpo)."""
        return getattr(self, self.stage)

    def to_toml(self, comments: bool = True) -> str:
        """The resolved config as TOML text that `load_config` reads back to an equal Config."""
        return render_toml(self, comments=comments)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `config.toml` into `directory` (created if needed); returns its path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "config.toml"
        path.write_text(self.to_toml())
        return path


# ----------------------------------------------------------------------------- types of values

def _toml_type(value: Any) -> str:
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
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    raise TypeError(f"minirlhf/config.py: no TOML rule for field type {tp!r}")


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
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option)
            except TypeError:
                pass
    raise TypeError(_type_name(tp))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (),
                stage: str | None = None) -> Config:
    """Read a TOML config, apply `--set section.key=value` overrides, validate, and return a Config.

    path: the TOML file (None = start from the defaults). overrides: strings like `train.lr=1e-4` or
    `model.init.hidden_size=128`; the value is parsed with TOML rules (`1e-4` is a float, `true` a
    boolean, `["q_proj"]` an array) and, when it is not a TOML value, taken as a bare string
    (`model.path=/data/m`). stage: one of STAGES; when the file also says `stage = ...` they must agree.
    """
    cfg = Config()
    origins: dict[tuple[str | None, str], str] = {}  # (section, key) -> file or --set argument that set it
    file_stage = None
    source = "defaults"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file.resolve()}")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
        base = file.resolve().parent
        file_stage = raw.pop("stage", None)
        if file_stage is not None and not isinstance(file_stage, str):
            raise ConfigError(f"{source}: stage must be a string, got {_toml_type(file_stage)} "
                              f"{_toml_value(file_stage)}")
        for name, table in raw.items():
            if name not in SECTION_TYPES:
                if not isinstance(table, dict):
                    raise ConfigError(f"{source}: key '{name}' must be inside a section"
                                      f"{_key_hint(name, None, ())}")
                raise ConfigError(f"{source}: unknown section [{name}]{_suggest_section(name)}")
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, got {_toml_type(table)} "
                                  f"{_toml_value(table)}")
            _apply_table(getattr(cfg, name), name, table, source, base, origins)
    if stage is not None and file_stage is not None and stage != file_stage:
        raise ConfigError(f"{source}: stage = {_toml_value(file_stage)} but the stage given is "
                          f"{_toml_value(stage)}")
    cfg.stage = stage or file_stage or ""
    if not cfg.stage:
        raise ConfigError(f"{source}: no stage given (pass one, or write stage = \"...\" at the top of the file)")
    for item in overrides:
        _apply_override(cfg, item, origins)
    _resolve_defaults(cfg)
    try:
        cfg.validate()
    except ConfigError as e:
        where = origins.get((e.section, e.key), source)
        raise ConfigError(f"{e} ({where})", e.section, e.key) from None
    return cfg


def _suggest_section(name: str) -> str:
    hint = _suggest(name, SECTION_TYPES)
    return hint.replace("'", "[", 1).replace("'", "]", 1) if hint else ""


def _apply_table(obj: Any, section: str, table: dict, source: str, base: Path | None,
                 origins: dict) -> None:
    """Type-check and set each `key = value` of one TOML table on the section dataclass `obj`."""
    types_ = _field_types(type(obj))
    for key, value in table.items():
        if key not in types_:
            raise ConfigError(f"{source}: [{section}] unknown key '{key}'{_key_hint(key, section, types_)}",
                              section, key)
        _set_field(obj, section, key, value, types_[key], source, base, origins)


def _set_field(obj: Any, section: str, key: str, value: Any, tp: Any, source: str, base: Path | None,
               origins: dict) -> None:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}.{key}] must be a table, got {_toml_type(value)} "
                              f"{_toml_value(value)}", section, key)
        _apply_table(getattr(obj, key), f"{section}.{key}", value, source, base, origins)
        return
    try:
        value = _convert(value, tp)
    except TypeError as e:
        raise ConfigError(f"{source}: [{section}] {key} must be {e}, got {_toml_type(value)} "
                          f"{_toml_value(value)}", section, key) from None
    meta = {f.name: f.metadata for f in dataclasses.fields(obj)}[key]
    if meta.get("path") and base is not None:
        value = _resolve_field(value, base, meta["path"])
    setattr(obj, key, value)
    origins[(section, key)] = source


def _resolve(value: str, base: Path, suffix: bool | str = True) -> str:
    """A relative path made absolute against `base`; '', 'auto', inline Jinja ('{' in it) and, for a field
    whose paths end in `suffix`, values that do not (chat template names) stay as they are."""
    if not value or value == "auto" or "{" in value or os.path.isabs(value):
        return value
    if isinstance(suffix, str) and not value.endswith(suffix):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _resolve_field(value: str | list[str], base: Path, suffix: bool | str) -> str | list[str]:
    return [_resolve(v, base, suffix) for v in value] if isinstance(value, list) else _resolve(value, base, suffix)


def _resolve_defaults(cfg: Config) -> None:
    """Make the paths still relative (defaults such as output_dir) absolute against the current directory,
    so that a saved config means the same thing wherever it is read from."""
    cwd = Path.cwd()

    def walk(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            elif f.metadata.get("path"):
                setattr(obj, f.name, _resolve_field(value, cwd, f.metadata["path"]))

    for name in SECTION_TYPES:
        walk(getattr(cfg, name))


def _apply_override(cfg: Config, item: str, origins: dict) -> None:
    where = f"--set {item}"
    key_path, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"{where}: expected section.key=value")
    parts = key_path.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"{where}: expected section.key=value, got key '{key_path.strip()}'"
                          f"{_key_hint(key_path.strip(), None, ())}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    name, *inner, key = parts
    if name not in SECTION_TYPES:
        raise ConfigError(f"{where}: unknown section [{name}]{_suggest_section(name)}")
    obj, section = getattr(cfg, name), name
    for sub in inner:
        types_ = _field_types(type(obj))
        if sub not in types_ or not dataclasses.is_dataclass(types_[sub]):
            tables = [k for k, t in types_.items() if dataclasses.is_dataclass(t)]
            raise ConfigError(f"{where}: [{section}] has no table '{sub}'{_suggest(sub, tables)}")
        obj, section = getattr(obj, sub), f"{section}.{sub}"
    types_ = _field_types(type(obj))
    if key not in types_:
        raise ConfigError(f"{where}: [{section}] unknown key '{key}'{_key_hint(key, section, types_)}",
                          section, key)
    _set_field(obj, section, key, value, types_[key], where, Path.cwd(), origins)


# ----------------------------------------------------------------------------- rendering

def _toml_value(value: Any) -> str:
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
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
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
        lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    for value, sub in tables:
        _render_section(value, sub, comments, lines)


def render_toml(cfg: Config, comments: bool = True) -> str:
    """`cfg` as TOML: `stage`, then every section with every key (each preceded by its help line)."""
    lines = [f"stage = {_toml_value(cfg.stage)}", ""]
    for name in SECTION_TYPES:
        _render_section(getattr(cfg, name), name, comments, lines)
    return "\n".join(lines)


def default_toml(stage: str = "sft") -> str:
    """The documented default config: every section and key with its default and its one-line help."""
    return render_toml(Config(stage=stage), comments=True)


def iter_fields() -> Iterator[tuple[str, str, str, str, str]]:
    """(section, key, type, default as TOML, help) for every field, for documentation tables."""

    def walk(cls: type, section: str) -> Iterator[tuple[str, str, str, str, str]]:
        obj = cls()
        for name, tp in _field_types(cls).items():
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{section}.{name}")
                continue
            help_ = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]["help"]
            yield section, name, _type_name(tp), _toml_value(getattr(obj, name)), help_

    for section, cls in SECTION_TYPES.items():
        yield from walk(cls, section)
