"""Run configuration: the schema (one dataclass per section) and its validation; the TOML machinery that
reads files and `--set` overrides into it is minirlhf/toml_fields.py.

A config file has one table per concern and one per stage:

    stage = "dpo"                     # optional; must agree with `--stage` when both are given
    [model]   path, tokenizer, dtype, backend, and [model.init] for a fresh tiny model
    [data]    files, format, field names, cutoff_len, block_size, eval split, seed ...
    [train]   optimizer, schedule, batch sizes, precision, checkpoints, logging
    [lora]    LoRA adapters
    [pt] [sft] [rm] [dpo] [kto] [ppo]   stage hyperparameters, each defined by its stage (minirlhf/stages)

Every field has a default and a one-line `help` in its metadata; `default_toml()` renders them all as a
commented TOML file and `iter_fields()` yields rows for documentation tables. Loading is strict: an
unknown section or key, a value of the wrong TOML type or out of range is a `ConfigError` that names the
file (or the `--set` argument), the section and the key (see toml_fields.py).
Relative paths in a file resolve against that file's folder; relative paths in `--set`, and relative
defaults such as `runs/out`, against the current directory, so a loaded Config holds absolute paths.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from minirlhf import toml_fields
from minirlhf.stages import REGISTRY, new_sections, spec
from minirlhf.toml_fields import (
    ConfigError,
    apply_override,
    apply_tables,
    check,
    check_choice,
    read_toml,
    render,
    resolve_relative,
    setting,
    suggest,
    toml_type,
    toml_value,
)

# ----------------------------------------------------------------------------- sections

@dataclass
class ModelInit:
    """Shape of a fresh, randomly initialised model (used when [model] path is empty).

    The vocabulary size and special token ids come from the tokenizer.
    """

    section = "model.init"
    model_type: str = setting("llama", "architecture family: llama | mistral | qwen2 | gpt2")
    hidden_size: int = setting(64, "width of the residual stream")
    intermediate_size: int = setting(176, "width of the MLP's hidden layer")
    num_hidden_layers: int = setting(2, "number of transformer blocks")
    num_attention_heads: int = setting(4, "query heads per block")
    num_key_value_heads: int = setting(2, "key/value heads per block (grouped-query attention; = heads for MHA)")
    max_position_embeddings: int = setting(512, "longest sequence the positions support")
    rope_theta: float = setting(10000.0, "RoPE base frequency (llama family)")
    tie_word_embeddings: bool = setting(False, "share the input embedding with the LM head (always on for gpt2)")

    def validate(self) -> None:
        s = self.section
        check_choice(s, "model_type", self.model_type, ("llama", "mistral", "qwen2", "gpt2"))
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            check(getattr(self, key) >= 1, s, key, ">= 1", getattr(self, key))
        check(self.rope_theta > 0, s, "rope_theta", "> 0", self.rope_theta)
        check(self.hidden_size % self.num_attention_heads == 0, s, "hidden_size",
              f"a multiple of num_attention_heads = {self.num_attention_heads}", self.hidden_size)
        check(self.num_attention_heads % self.num_key_value_heads == 0, s, "num_key_value_heads",
              f"a divisor of num_attention_heads = {self.num_attention_heads}", self.num_key_value_heads)


@dataclass
class ModelSection:
    section = "model"
    path: str = setting("", "HF-format model directory to start from; empty = a fresh model built from [model.init]",
                        path=True)
    tokenizer: str = setting("", "tokenizer directory; empty = the model path", path=True)
    dtype: str = setting("auto", "weight dtype when loading: auto (checkpoint's) | float32 | bfloat16 | float16")
    backend: str = setting("auto", "attention and fused-loss kernels: auto (Triton on CUDA) | triton | torch")
    init: ModelInit = field(default_factory=ModelInit, metadata={"help": "fresh model shape", "path": False})

    def validate(self) -> None:
        check_choice("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_choice("model", "backend", self.backend, ("auto", "triton", "torch"))
        self.init.validate()

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer directory: `tokenizer`, else the model `path`."""
        return self.tokenizer or self.path


@dataclass
class DataSection:
    section = "data"
    train_files: list[str] = setting([], "training files: .jsonl, .json (an array of objects) or .txt (pt only)",
                                     path=True)
    eval_files: list[str] = setting([], "evaluation files; empty = hold out eval_split of the training rows",
                                    path=True)
    format: str = setting("auto", "auto (the stage's format; sft detects alpaca/sharegpt per row) | text | alpaca "
                                  "| sharegpt | preference | kto | prompt")
    text_field: str = setting("text", "pt: column holding a document (jsonl)")
    instruction_field: str = setting("instruction", "alpaca: column holding the instruction")
    input_field: str = setting("input", "alpaca: optional column appended to the instruction after a blank line")
    output_field: str = setting("output", "alpaca: column holding the answer")
    system_field: str = setting("system", "optional column holding a system prompt (alpaca, sharegpt, preference)")
    messages_field: str = setting("", "sharegpt: column holding the turns; empty = 'conversations' or 'messages'")
    prompt_field: str = setting("prompt", "preference/kto/prompt: column holding the prompt ('query' also accepted)")
    chosen_field: str = setting("chosen", "preference: column holding the preferred answer")
    rejected_field: str = setting("rejected", "preference: column holding the dispreferred answer")
    completion_field: str = setting("completion", "kto: column holding the answer")
    label_field: str = setting("label", "kto: column holding true (desirable) / false (undesirable)")
    cutoff_len: int = setting(1024, "longest tokenized example; the prompt loses its oldest tokens first")
    block_size: int = setting(1024, "pt (and sft packing): tokens per packed block")
    eval_split: float = setting(0.0, "fraction of training rows held out for evaluation (when no eval_files)")
    seed: int = setting(42, "seed of the eval split and of the per-epoch shuffle")
    shuffle: bool = setting(True, "reshuffle the training examples every epoch")
    skip_bad_rows: bool = setting(False, "skip malformed rows (and report how many) instead of stopping")
    chat_template: str = setting("", "override the tokenizer's chat template: a built-in name (chatml, llama2, llama3, "
                                     "alpaca, vicuna, plain), a .jinja file, or Jinja source", path=".jinja")
    num_workers: int = setting(0, "processes used to tokenize (0 = this process)")

    def validate(self) -> None:
        s = self.section
        from minirlhf.data import FORMATS

        check_choice(s, "format", self.format, ("auto", *FORMATS))
        for key in ("text_field", "instruction_field", "input_field", "output_field", "system_field",
                    "prompt_field", "chosen_field", "rejected_field", "completion_field", "label_field"):
            check(bool(getattr(self, key)), s, key, "a non-empty column name", getattr(self, key))
        check(self.cutoff_len >= 2, s, "cutoff_len", ">= 2", self.cutoff_len)
        check(self.block_size >= 2, s, "block_size", ">= 2", self.block_size)
        check(0.0 <= self.eval_split < 1.0, s, "eval_split", "in [0, 1)", self.eval_split)
        check(self.num_workers >= 0, s, "num_workers", ">= 0", self.num_workers)
        if self.eval_files and self.eval_split > 0:
            raise ConfigError(f"[{s}] eval_split must be 0 when eval_files are given, got "
                              f"{toml_value(self.eval_split)}", s, "eval_split")


@dataclass
class TrainSection:
    section = "train"
    output_dir: str = setting("runs/out", "where checkpoints, metrics.jsonl and config.toml are written", path=True)
    seed: int = setting(42, "seed of model init, dropout and sampling")
    lr: float = setting(1e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of lr (cosine and linear schedules)")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (not applied to norms, biases, embeddings)")
    betas: list[float] = setting([0.9, 0.95], "AdamW (beta1, beta2)")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    warmup_steps: int = setting(0, "optimizer steps of linear warmup from 0 to lr")
    schedule: str = setting("cosine", "learning-rate decay after warmup: cosine | linear | constant")
    max_steps: int = setting(0, "optimizer steps to run; 0 = run `epochs` epochs")
    epochs: int = setting(1, "passes over the training data (when max_steps = 0)")
    micro_batch_size: int = setting(4, "examples per forward/backward")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this; 0 = no clipping")
    precision: str = setting("auto", "auto (bf16 autocast where supported, else fp32) | fp32 | bf16")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward")
    disable_dropout: bool = setting(True, "rm, ppo, dpo, kto: set every dropout ([lora] dropout included) of the "
                                          "trained model, critic and reference to 0, as TRL does (ratios and "
                                          "log-ratios compare the model with itself or a reference); pt and sft keep "
                                          "dropout")
    fsdp_cpu_offload: bool = setting(False, "under torchrun: keep FSDP's sharded weights, gradients and optimizer "
                                            "states in host memory (slower, for models that do not fit)")
    fsdp_reshard_after_forward: bool = setting(True, "under torchrun: free each block's gathered weights after its "
                                                     "forward and gather again in backward (ZeRO-3); false keeps "
                                                     "them (ZeRO-2: faster, more memory)")
    compile: bool = setting(False, "run each transformer block's training forward and backward through torch.compile "
                                   "(inductor fuses the elementwise work; the first steps compile, tens of seconds "
                                   "on a CPU); generation and no-grad forwards stay eager")
    eval_every: int = setting(0, "optimizer steps between evaluations; 0 = only at the end")
    save_every: int = setting(0, "optimizer steps between checkpoints; 0 = only at the end")
    keep_last: int = setting(2, "intermediate checkpoints kept on disk")
    log_every: int = setting(10, "optimizer steps between metric lines")
    resume: str = setting("", "'' = start fresh, 'auto' = latest checkpoint in output_dir, or a checkpoint path",
                          path=True)
    overwrite: bool = setting(False, "start afresh in an output_dir holding an earlier run, deleting that run's files "
                                     "(never files minirlhf did not write)")
    threads: int = setting(0, "CPU threads of torch's kernels (torch.set_num_threads); 0 = torch's default, which "
                              "follows OMP_NUM_THREADS")

    def validate(self) -> None:
        s = self.section
        check(self.lr > 0, s, "lr", "> 0", self.lr)
        check(0.0 <= self.min_lr_ratio <= 1.0, s, "min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        check(self.weight_decay >= 0, s, "weight_decay", ">= 0", self.weight_decay)
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), s, "betas",
              "two numbers in [0, 1)", self.betas)
        check(self.adam_eps > 0, s, "adam_eps", "> 0", self.adam_eps)
        check(self.warmup_steps >= 0, s, "warmup_steps", ">= 0", self.warmup_steps)
        check_choice(s, "schedule", self.schedule, ("cosine", "linear", "constant"))
        check(self.max_steps >= 0, s, "max_steps", ">= 0", self.max_steps)
        check(self.max_steps > 0 or self.epochs >= 1, s, "epochs", ">= 1 when max_steps = 0", self.epochs)
        check(self.micro_batch_size >= 1, s, "micro_batch_size", ">= 1", self.micro_batch_size)
        check(self.grad_accum >= 1, s, "grad_accum", ">= 1", self.grad_accum)
        check(self.max_grad_norm >= 0, s, "max_grad_norm", ">= 0", self.max_grad_norm)
        check_choice(s, "precision", self.precision, ("auto", "fp32", "bf16"))
        for key in ("eval_every", "save_every"):
            check(getattr(self, key) >= 0, s, key, ">= 0", getattr(self, key))
        check(self.keep_last >= 1, s, "keep_last", ">= 1", self.keep_last)
        check(self.log_every >= 1, s, "log_every", ">= 1", self.log_every)
        check(self.threads >= 0, s, "threads", ">= 0", self.threads)
        if self.overwrite and self.resume:
            raise ConfigError(f"[{s}] overwrite must be false when resuming (it starts afresh), got true with "
                              f"resume = {toml_value(self.resume)}", s, "overwrite")
        check(bool(self.output_dir), s, "output_dir", "a directory path", self.output_dir)


@dataclass
class LoraSection:
    section = "lora"
    enabled: bool = setting(False, "train low-rank adapters instead of all weights (Hu et al. 2021)")
    r: int = setting(8, "adapter rank")
    alpha: float = setting(16.0, "scale numerator: the update is (alpha / r) * B A, or alpha / sqrt(r) with rslora")
    dropout: float = setting(0.0, "dropout on the adapter input")
    rslora: bool = setting(False, "rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)")
    target_modules: str | list[str] = setting("all-linear", "'all-linear' (every projection except lm_head) or a "
                                                            "list of names such as ['q_proj', 'v_proj']")
    modules_to_save: list[str] = setting([], "modules trained in full and saved with the adapter (e.g. ['lm_head'])")

    def validate(self) -> None:
        s = self.section
        check(self.r >= 1, s, "r", ">= 1", self.r)
        check(self.alpha > 0, s, "alpha", "> 0", self.alpha)
        check(0.0 <= self.dropout < 1.0, s, "dropout", "in [0, 1)", self.dropout)
        if isinstance(self.target_modules, str):
            check(self.target_modules == "all-linear", s, "target_modules",
                  "'all-linear' or a list of module names", self.target_modules)
        else:
            from minirlhf.lora import LINEAR_TARGETS  # the projection names LoRA may wrap

            check(len(self.target_modules) > 0, s, "target_modules", "a non-empty list", self.target_modules)
            for name in self.target_modules:
                if name not in LINEAR_TARGETS:
                    raise ConfigError(f"[{s}] target_modules has unknown module {toml_value(name)}"
                                      f"{suggest(name, LINEAR_TARGETS)}; known: {', '.join(LINEAR_TARGETS)}",
                                      s, "target_modules")
        for name in self.modules_to_save:
            check(bool(name), s, "modules_to_save", "a list of module names", self.modules_to_save)


# the sections every run has; each registered stage adds its own ([pt], [dpo], ...: minirlhf/stages)
SECTION_TYPES = {"model": ModelSection, "data": DataSection, "train": TrainSection, "lora": LoraSection}


@dataclass
class Config:
    """A whole run's settings: `stage` plus one attribute per section (`cfg.train.lr`).

    The stage sections come from the stage registry (minirlhf/stages): `stage_sections` holds one of each
    registered stage, {"pt": PTSection(), ...}, and each is an attribute too: `cfg.dpo` is
    cfg.stage_sections["dpo"].
    """

    stage: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    stage_sections: dict[str, Any] = field(default_factory=new_sections)

    def __getattr__(self, name: str) -> Any:
        """A stage's section (`cfg.ppo`); only called for names that are not ordinary attributes."""
        sections = self.__dict__.get("stage_sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def sections(self) -> dict[str, Any]:
        """Every section of the run by name, in file order: {"model": self.model, ..., "pt": ..., "ppo": ...}."""
        return {**{name: getattr(self, name) for name in SECTION_TYPES}, **self.stage_sections}

    def validate(self) -> None:
        """Each section's own checks, then the ones that involve the stage or several sections."""
        if self.stage not in REGISTRY:
            raise ConfigError(f"stage must be one of {', '.join(REGISTRY)}, got {toml_value(self.stage)}"
                              f"{suggest(self.stage, REGISTRY)}", None, "stage")
        for section in self.sections().values():
            section.validate()
        if not self.model.path and not self.model.tokenizer:
            raise ConfigError("[model] tokenizer must be set when path is empty (a fresh model takes its "
                              "vocabulary from the tokenizer), got \"\"", "model", "tokenizer")
        if not self.data.train_files:
            raise ConfigError("[data] train_files must list at least one file, got []", "data", "train_files")
        allowed = ("auto", *spec(self.stage).data_formats)
        if self.data.format not in allowed:
            raise ConfigError(f"[data] format must be one of {', '.join(map(toml_value, allowed))} for stage "
                              f"{self.stage}, got {toml_value(self.data.format)}", "data", "format")
        self.stage_sections[self.stage].validate_run(self)

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


# ----------------------------------------------------------------------------- loading and rendering

def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (),
                stage: str | None = None) -> Config:
    """Read a TOML config, apply `--set section.key=value` overrides, validate, and return a Config.

    path: the TOML file (None = start from the defaults). overrides: strings like `train.lr=1e-4` or
    `model.init.hidden_size=128` (toml_fields.apply_override). stage: one of the registered stages
    (minirlhf/stages); when the file also says `stage = ...` they must agree.
    """
    cfg = Config()
    origins: dict[tuple[str | None, str], str] = {}  # (section, key) -> file or --set argument that set it
    file_stage = None
    source = "defaults"
    if path is not None:
        raw, source, base = read_toml(path)
        file_stage = raw.pop("stage", None)
        if file_stage is not None and not isinstance(file_stage, str):
            raise ConfigError(f"{source}: stage must be a string, got {toml_type(file_stage)} "
                              f"{toml_value(file_stage)}")
        apply_tables(cfg.sections(), raw, source, base, origins)
    if stage is not None and file_stage is not None and stage != file_stage:
        raise ConfigError(f"{source}: stage = {toml_value(file_stage)} but the stage given is "
                          f"{toml_value(stage)}")
    cfg.stage = stage or file_stage or ""
    if not cfg.stage:
        raise ConfigError(f"{source}: no stage given (pass one, or write stage = \"...\" at the top of the file)")
    for item in overrides:
        apply_override(cfg.sections(), item, origins)
    resolve_relative(cfg.sections(), Path.cwd())
    try:
        cfg.validate()
    except ConfigError as e:
        where = origins.get((e.section, e.key), source)
        raise ConfigError(f"{e} ({where})", e.section, e.key) from None
    return cfg


def render_toml(cfg: Config, comments: bool = True) -> str:
    """`cfg` as TOML: `stage`, then every section with every key (each preceded by its help line)."""
    return "\n".join([f"stage = {toml_value(cfg.stage)}", "", *render(cfg.sections(), comments)])


def default_toml(stage: str = "sft") -> str:
    """The documented default config: every section and key with its default and its one-line help."""
    return render_toml(Config(stage=stage), comments=True)


def iter_fields() -> Iterator[tuple[str, str, str, str, str]]:
    """(section, key, type, default as TOML, help) for every field, for documentation tables."""
    return toml_fields.iter_fields({name: type(obj) for name, obj in Config().sections().items()})
