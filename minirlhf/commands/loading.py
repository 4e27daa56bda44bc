"""What the commands share: the model options, and loading a policy (a model directory, or a LoRA adapter
on its base), its tokenizer and a reward model, with one-line errors for directories that are not them.

    --model DIR     a full model directory, or a LoRA adapter directory whose adapter_config.json names
                    its base (base_model_name_or_path)
    --adapter DIR   a LoRA adapter (PEFT layout) on top of --model; merged into the weights on load
                    unless --no-merge
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minirlhf.commands import CommandError

if TYPE_CHECKING:
    import torch

    from minirlhf.heads import RewardModel
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
FALLBACK_TEMPLATE = "plain"  # for tokenizers without a chat template (gpt2 and other base models)


def add_model_arguments(p: argparse.ArgumentParser, flag: str = "--model", or_file: str = "") -> None:
    """--model/--adapter/--no-merge/--template/--dtype/--device, as every generating command takes them.
    or_file: what else `flag` may name (a file), said in its help."""
    p.add_argument(flag, required=True, metavar="DIR|FILE" if or_file else "DIR",
                   help="model directory in Hugging Face format (llama, mistral, qwen2, gpt2), e.g. a stage's "
                        "output_dir; or a LoRA adapter directory whose adapter_config.json names its base"
                        + (f"; or {or_file}" if or_file else ""))
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory (PEFT layout) to apply on top of "
                                                    f"{flag}")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep the adapter's layers separate instead of merging them into the weights "
                        "(slower; the same outputs up to rounding)")
    add_runtime_arguments(p)


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", metavar="NAME|FILE",
                   help="chat template instead of the tokenizer's own: chatml, llama2, llama3, alpaca, vicuna, "
                        f"plain, or a .jinja file (default: the model's; '{FALLBACK_TEMPLATE}' when it has none)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                   help="weights dtype (default auto: as stored in the checkpoint)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")


def resolve_device(name: str | None) -> "torch.device":
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> "torch.dtype | None":
    import torch

    return None if name == "auto" else getattr(torch, name)


@dataclass
class ModelPaths:
    """Where a policy's pieces are: the base weights, an optional adapter, the tokenizer files."""

    base: Path
    adapter: Path | None
    tokenizer: Path

    def describe(self) -> str:
        return f"{self.adapter} on {self.base}" if self.adapter else str(self.base)


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json", "vocab.json"))


def resolve_model_paths(model: str | Path, adapter: str | Path | None = None) -> ModelPaths:
    """Check that `model` (and `adapter`) are what they claim to be, and find the base of a lone adapter."""
    model = Path(model)
    if not model.is_dir():
        raise CommandError(f"{model} is not a model directory: it does not exist or is a file")
    if _is_adapter(model):
        if adapter is not None:
            raise CommandError(f"{model} is a LoRA adapter; give the base model as --model and the adapter as "
                               f"--adapter")
        adapter, model = model, _adapter_base(model)
    elif not (model / "config.json").is_file():
        raise CommandError(f"{model} is not a model directory: it has no config.json (nor adapter_config.json)")
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise CommandError(f"{adapter} is not a LoRA adapter directory: it has no adapter_config.json")
    tokenizer = adapter if adapter is not None and _has_tokenizer(adapter) else model
    if not _has_tokenizer(tokenizer):
        raise CommandError(f"{tokenizer} has no tokenizer files (tokenizer.model, tokenizer.json or vocab.json "
                           f"+ merges.txt)")
    return ModelPaths(model, adapter, tokenizer)


def _adapter_base(adapter: Path) -> Path:
    """The base model directory an adapter names, or an error saying how to give it."""
    file = adapter / "adapter_config.json"
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise CommandError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not base:
        raise CommandError(f"{adapter} is a LoRA adapter and its adapter_config.json names no base model "
                           f"(base_model_name_or_path); pass the base as --model BASE --adapter {adapter}")
    base_path = Path(base)
    if not base_path.is_absolute() and not base_path.is_dir():
        base_path = adapter / base  # a path relative to the adapter
    if not (base_path / "config.json").is_file():
        raise CommandError(f"{adapter} is a LoRA adapter whose base model {base!r} (base_model_name_or_path in "
                           f"adapter_config.json) is not a model directory here; pass it as --model BASE "
                           f"--adapter {adapter}")
    return base_path


def load_chat_tokenizer(path: str | Path, template: str | None = None, quiet: bool = False,
                        fallback: bool = True) -> "Tokenizer":
    """The tokenizer of a model directory, with `template` (or, when the directory has no chat template and
    fallback is on, the built-in FALLBACK_TEMPLATE, said on stderr unless quiet) as its chat template."""
    import jinja2

    from minirlhf.errors import UserError
    from minirlhf.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(str(path), chat_template=template)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # the tokenizer's own file and template errors
        raise CommandError(f"{path}: cannot load the tokenizer: {e}") from None
    except jinja2.TemplateError as e:
        raise CommandError(f"{path}: the chat template does not compile: {e}") from None
    if tok.chat_template is None and fallback:
        if not quiet:
            print(f"note: {path} has no chat template; using the built-in '{FALLBACK_TEMPLATE}' template "
                  f"(choose another with --template)", file=sys.stderr)
        tok.set_chat_template(FALLBACK_TEMPLATE)
    return tok


def load_policy(paths: ModelPaths, merge: bool = True, dtype: "torch.dtype | None" = None,
                device: "torch.device | str" = "cpu", tok: "Tokenizer | None" = None) -> "Transformer":
    """The causal LM of `paths` in eval mode: the base weights, with the adapter merged (or kept as LoRA
    layers when merge is False). tok: the tokenizer it will be fed, checked against its embeddings
    (`check_vocabulary`)."""
    from minirlhf.model import Transformer

    _refuse_reward_model(paths.base)
    model = Transformer.from_pretrained(paths.base, dtype=dtype, device=device)
    if paths.adapter is not None:
        from minirlhf.lora import merge_and_unload
        from minirlhf.peft import load_adapter

        load_adapter(model, paths.adapter)
        model.to(device)
        if merge:
            merge_and_unload(model)
    if tok is not None:
        check_vocabulary(tok, model.config.vocab_size, paths.describe())
    return model.eval()


def _refuse_reward_model(path: Path) -> None:
    from minirlhf.heads import is_reward_model_config

    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # Transformer.from_pretrained names what is wrong with it
    if is_reward_model_config(hf):
        raise CommandError(f"{path} is a reward model (a *ForSequenceClassification directory), not a policy "
                           f"that generates text")


def load_reward_model(path: str | Path, dtype: "torch.dtype | None" = None,
                      device: "torch.device | str" = "cpu") -> "RewardModel":
    """A saved reward model (`*ForSequenceClassification`, e.g. an rm run's output) in eval mode; a causal LM
    directory is refused by RewardModel.from_pretrained (its score head would be random)."""
    from minirlhf.heads import RewardModel

    return RewardModel.from_pretrained(path, dtype=dtype, device=device).eval()


def check_vocabulary(tok: "Tokenizer", model_vocab: int, where: str) -> None:
    """A tokenizer whose ids reach past the model's embeddings would index out of range deep in a forward."""
    if tok.vocab_size > model_vocab:
        raise CommandError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model only {model_vocab} "
                           f"embeddings")


def check_same_vocabulary(a: "Tokenizer", a_name: str, b: "Tokenizer", b_name: str) -> None:
    """Two models that exchange token ids (a policy's answers scored by a reward model, a reference's
    log-probs of a policy's samples) must share one vocabulary: same size, same piece at every id."""
    if a.vocab_size != b.vocab_size:
        raise CommandError(f"vocabulary mismatch: {a_name} has a {a.vocab_size}-token vocabulary, {b_name} "
                           f"{b.vocab_size}; they must share one tokenizer")
    step = max(1, a.vocab_size // 997)  # ~1000 ids spread over the vocabulary, the specials included
    for i in sorted(set(range(0, a.vocab_size, step)) | {a.eos_id, a.pad_id}):
        if a.id_to_token(i) != b.id_to_token(i):
            raise CommandError(f"vocabulary mismatch: token {i} is {a.id_to_token(i)!r} for {a_name} but "
                               f"{b.id_to_token(i)!r} for {b_name}; they must share one tokenizer")
