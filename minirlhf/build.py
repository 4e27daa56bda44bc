"""From a Config to the objects a stage trains: tokenizer, decoder (loaded or fresh), LoRA.

Every stage starts here, so a config's [model] and [lora] sections mean the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minirlhf.config import Config, ConfigError
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tokenizer(cfg: Config) -> Tokenizer:
    path = cfg.model.tokenizer_path
    if not Path(path).is_dir():
        raise ConfigError(f"[model] tokenizer directory {path!r} does not exist", "model", "tokenizer")
    return load_tokenizer(path, chat_template=cfg.data.chat_template or None)


def fresh_model_config(cfg: Config, tok: Tokenizer) -> ModelConfig:
    """The [model.init] shape with the tokenizer's vocabulary and special tokens."""
    init = cfg.model.init
    return ModelConfig(
        model_type=init.model_type,
        vocab_size=tok.vocab_size,
        hidden_size=init.hidden_size,
        intermediate_size=init.intermediate_size,
        num_hidden_layers=init.num_hidden_layers,
        num_attention_heads=init.num_attention_heads,
        num_key_value_heads=init.num_key_value_heads,
        max_position_embeddings=init.max_position_embeddings,
        rope_theta=init.rope_theta,
        tie_word_embeddings=init.tie_word_embeddings,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )


def build_model(cfg: Config, tok: Tokenizer, path: str | None = None,
                device: torch.device | str = "cpu", rank: int | None = None) -> Transformer:
    """Load [model] path (or `path`), else build a fresh model from [model.init] seeded by [train] seed.

    rank: under torchrun, this process's rank when only rank 0 is to read the weights: rank 0 loads them
    into host memory (FSDP moves its shards to the device), the others build the model on the meta
    device and read nothing (distributed.prepare_stage fills them from rank 0). A fresh model is built
    in full on every rank anyway (seeded).
    A tokenizer larger than the model's vocabulary is an error: ids past the embedding would crash
    (or worse, silently wrap) deep inside the forward pass.
    """
    path = path if path is not None else cfg.model.path
    if path:
        model = load_model(path, DTYPES[cfg.model.dtype], device, rank)
    else:
        torch.manual_seed(cfg.train.seed)
        model = Transformer(fresh_model_config(cfg, tok)).to(device)
    return prepare_backbone(cfg, tok, model, path)


def load_model(path: str, dtype: torch.dtype | None, device: torch.device | str,
               rank: int | None = None) -> Transformer:
    """from_pretrained onto device; with a torchrun rank (see build_model), onto the host on rank 0 and
    onto the meta device, unread, elsewhere."""
    if rank is None:
        return Transformer.from_pretrained(path, dtype=dtype, device=device)
    if rank == 0:
        return Transformer.from_pretrained(path, dtype=dtype, device="cpu")
    from minirlhf.checkpoint import pretrained_skeleton

    return pretrained_skeleton(path, dtype=dtype)


def prepare_backbone(cfg: Config, tok: Tokenizer, model: Transformer, source: str) -> Transformer:
    """Check the tokenizer fits the embeddings and apply the run's kernel and checkpointing switches."""
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"[model] the tokenizer at {cfg.model.tokenizer_path!r} has {tok.vocab_size} tokens but the model "
            f"{source or '(fresh)'} only {model.config.vocab_size} embeddings", "model", "tokenizer")
    model.kernel_backend = cfg.model.backend
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model


def apply_lora(cfg: Config, model: Transformer) -> Transformer:
    """Freeze the base and add adapters when [lora] enabled; otherwise every weight trains."""
    if not cfg.lora.enabled:
        return model
    from minirlhf.lora import LoRAConfig, inject_lora

    lc = cfg.lora
    inject_lora(model, LoRAConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, rslora=lc.rslora,
                                  target_modules=lc.target_modules, modules_to_save=list(lc.modules_to_save)))
    return model
