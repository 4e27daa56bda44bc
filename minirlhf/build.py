"""From a Config to the objects a stage trains: tokenizer, decoder (loaded or fresh), LoRA.

Every stage starts here, so a config's [model] and [lora] sections mean the same thing everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.config import Config
from minirlhf.errors import UserError
from minirlhf.heads import NotARewardModel, RewardModel
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer, load_tokenizer
from minirlhf.toml_fields import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tokenizer(cfg: Config) -> Tokenizer:
    path = cfg.model.tokenizer_path
    if not Path(path).is_dir():
        raise ConfigError(f"[model] tokenizer directory {path!r} does not exist", "model", "tokenizer")
    return load_tokenizer(path, chat_template=cfg.data.chat_template or None, template_origin="[data] chat_template")


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
    from minirlhf.hf_checkpoint import pretrained_skeleton

    return pretrained_skeleton(path, dtype=dtype)


def prepare_backbone(cfg: Config, tok: Tokenizer, model: Transformer, source: str, section: str = "model",
                     key: str = "tokenizer") -> Transformer:
    """Check the tokenizer fits the embeddings and, for GPT-2's learned positions, that the run's longest
    row fits the position table; apply the run's kernel and checkpointing switches.

    section, key: the config entry named by the error; ppo passes its reward_model / critic_model, whose
    embeddings must hold every id of the policy's tokenizer."""
    if tok.vocab_size > model.config.vocab_size:
        entry = f"[{section}]" if (section, key) == ("model", "tokenizer") else f"[{section}] {key}:"
        raise ConfigError(
            f"{entry} the tokenizer at {cfg.model.tokenizer_path!r} has {tok.vocab_size} tokens but the model "
            f"{source or '(fresh)'} only {model.config.vocab_size} embeddings", section, key)
    table = model.config.max_position_embeddings
    longest, length_section, length_key = cfg.stage_sections[cfg.stage].longest_row(cfg)
    if model.config.is_gpt2 and longest > table:
        where = f"{Path(source) / 'config.json'} n_positions" if source else "[model.init] max_position_embeddings"
        of = f"[data] cutoff_len + [ppo] max_new_tokens = {longest}" if length_key == "max_new_tokens" else \
            f"[{length_section}] {length_key} = {longest}"
        raise ConfigError(f"{of} is longer than the gpt2 model's position table ({where} = {table}): make it "
                          f"{table} or less", length_section, length_key)
    model.kernel_backend = cfg.model.backend
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return model


TOKENIZER_PROBE = "Hello, world! 0123456789 (tokenizer check) \u00e9\u00fc\u4e2d\u6587 \U0001f600"


def check_same_tokenizer(tok: Tokenizer, directory: str, section: str, key: str) -> None:
    """A model that reads the policy's token ids (ppo's reward model and critic) must come with the same
    tokenizer: when `directory` holds tokenizer files, its vocabulary size, its tokens at the policy's
    special ids (bos, eos, the stop tokens the reward model is read at) and its encoding of a probe text
    must equal the policy's. A directory without tokenizer files is not checked (only its vocabulary size,
    by prepare_backbone)."""
    try:
        other = load_tokenizer(directory)
    except (FileNotFoundError, ValueError, UserError):
        logger.info("[%s] %s: no readable tokenizer in %s; only its vocabulary size is checked", section, key,
                    directory)
        return
    ours = f"the policy's tokenizer at {tok.source_dir!r}"
    if other.vocab_size != tok.vocab_size:
        raise ConfigError(f"[{section}] {key} {directory!r} has a tokenizer of {other.vocab_size} tokens, {ours} "
                          f"{tok.vocab_size}: it would score another tokenizer's ids", section, key)
    special = sorted({i for i in (tok.bos_id, tok.eos_id, *tok.stop_ids) if i is not None})
    differ = [i for i in special if other.id_to_token(i) != tok.id_to_token(i)]
    if differ:
        i = differ[0]
        raise ConfigError(f"[{section}] {key} {directory!r}: token {i} is {other.id_to_token(i)!r} in its tokenizer "
                          f"but {tok.id_to_token(i)!r} in {ours}", section, key)
    if other.encode(TOKENIZER_PROBE) != tok.encode(TOKENIZER_PROBE):
        raise ConfigError(f"[{section}] {key} {directory!r}: its tokenizer encodes text differently from {ours} "
                          f"(same size, other vocabulary)", section, key)


def load_scalar_model(cfg: Config, tok: Tokenizer, path: str, section: str, key: str, dtype: torch.dtype | None,
                      device: torch.device | str, new_head: bool = False) -> RewardModel:
    """A reward model ([section] key: a saved reward model, nothing else) or, with new_head, the start of a
    critic (a reward model, or a causal LM that gets a fresh head seeded by [train] seed), checked against
    the policy's tokenizer: the embeddings must hold its ids (prepare_backbone) and a tokenizer saved with
    the model must be the same (check_same_tokenizer)."""
    try:
        model = RewardModel.from_pretrained(path, dtype=dtype, device=device, seed=cfg.train.seed, new_head=new_head)
    except NotARewardModel as e:
        raise ConfigError(f"[{section}] {key}: {e}", section, key) from None
    prepare_backbone(cfg, tok, model.backbone, path, section, key)
    check_same_tokenizer(tok, path, section, key)
    return model


def apply_lora(cfg: Config, model: Transformer) -> Transformer:
    """Freeze the base and add adapters when [lora] enabled; otherwise every weight trains.

    A backbone without an LM head (reward model, ppo critic) takes the [lora] settings minus lm_head
    (in target_modules and modules_to_save); when nothing is left to adapt, its backbone is frozen and
    only the scalar head trains."""
    if not cfg.lora.enabled:
        return model
    from minirlhf.lora import LoRAConfig, inject_lora

    lc = cfg.lora
    targets, to_save = lc.target_modules, list(lc.modules_to_save)
    if model.lm_head is None:
        to_save = [m for m in to_save if m != "lm_head"]
        if not isinstance(targets, str):
            targets = [t for t in targets if t != "lm_head"]
            if not targets and not to_save:
                model.requires_grad_(False)
                return model
    inject_lora(model, LoRAConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout, rslora=lc.rslora,
                                  target_modules=targets, modules_to_save=to_save))
    return model


def disable_dropout(cfg: Config, model: nn.Module) -> nn.Module:
    """With [train] disable_dropout (called by the rm, ppo, dpo and kto stages): every nn.Dropout of `model`,
    LoRA's included, at p = 0, in place, as TRL does by default. These stages compare the trained model
    with itself or with a reference (the PPO ratio pi / pi_old, the value clip around the rollout's
    values, DPO/KTO log-ratios to the reference), measured without dropout; dropout in the update alone
    would bias them (the first PPO ratio would not be 1). TRL's RewardConfig disables it for reward models
    too, and so does the rm stage."""
    if not cfg.train.disable_dropout:
        return model
    from minirlhf.lora import lora_layers

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for _, layer in lora_layers(model):
        layer.dropout_p = 0.0  # the fused LM-head path and the saved adapter config read it
    return model
