"""The pt and sft stages: next-token prediction, on packed documents (pt) or on the answers of
instruction data (sft, prompt tokens masked out of the loss by data.py).

NEFTune (Jain et al. 2023, Algorithm 1) adds uniform noise to the input embeddings while training:
    emb + U(-1, 1) * alpha / sqrt(L * d),   L = sequence length, d = embedding width.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.build import apply_lora, build_model, build_tokenizer
from minirlhf.config import Config
from minirlhf.data import IGNORE_INDEX, BatchIterator, build_datasets
from minirlhf.logprobs import causal_lm_loss
from minirlhf.model import Transformer
from minirlhf.tokenizer import Tokenizer
from minirlhf.trainer import Stage


def neftune_hook(alpha: float):
    """A forward hook for the embedding that adds NEFTune noise in training mode only."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        L, d = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(L * d)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


def save_policy(model: Transformer, tok: Tokenizer, out_dir: Path, base: str = "") -> None:
    """A full HF-format model, or the LoRA adapter in PEFT's layout (naming `base`, the directory the
    run started from, as its base model so that loaders find it), plus the tokenizer files."""
    from minirlhf.lora import has_lora, save_adapter

    if has_lora(model):
        save_adapter(model, out_dir, base_model_name_or_path=base or None)
    else:
        model.save_pretrained(out_dir)
    tok.save_pretrained(str(out_dir))


class PolicyStage(Stage):
    """A stage that trains a policy (pt, sft, dpo, kto): `model` and `tok`, saved by `save_policy`."""

    model: Transformer
    tok: Tokenizer

    def save_final(self, out_dir: Path) -> None:
        save_policy(self.model, self.tok, out_dir, self.cfg.model.path)


class LanguageModelingStage(PolicyStage):
    """pt and sft: mean cross-entropy over the trained labels of a step's micro-batches."""

    def __init__(self, cfg: Config, model: Transformer, tok: Tokenizer, train: list[dict], eval: list[dict],
                 collate):
        self.cfg, self.model, self.tok, self.collate = cfg, model, tok, collate
        self.batches = BatchIterator(train, cfg.train.micro_batch_size, collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle)
        self.eval_examples = eval
        if cfg.stage == "sft" and cfg.sft.neftune_alpha > 0:
            model.embed_tokens.register_forward_hook(neftune_hook(cfg.sft.neftune_alpha))

    def loss(self, batch):
        loss = causal_lm_loss(self.model, batch)
        return loss, {"loss": loss.detach()}

    def loss_tokens(self, batch) -> int:
        """The trained labels (positions 1..T-1 not -100): the loss is their mean, and the trainer weights
        micro-batches by them, so a step is the mean over every trained token of its batch."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def chance_loss(self) -> float:
        """ln V: the cross-entropy of a uniform guess over the model's vocabulary."""
        return math.log(self.model.config.vocab_size)

    def evaluate(self, trainer) -> dict[str, float]:
        """Token-weighted mean loss over the eval examples, and its perplexity."""
        if not self.eval_examples:
            return {}
        total, count = 0.0, 0
        size = self.cfg.train.micro_batch_size
        for i in range(0, len(self.eval_examples), size):
            batch = trainer.to_device(self.collate(self.eval_examples[i: i + size]))
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(causal_lm_loss(self.model, batch)) * n
                count += n
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> LanguageModelingStage:
    """rank: under torchrun, only rank 0 reads the model (see build.build_model)."""
    tok = build_tokenizer(cfg)
    model = apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank))
    data = build_datasets(cfg, tok)
    return LanguageModelingStage(cfg, model, tok, data.train, data.eval, data.collate)
