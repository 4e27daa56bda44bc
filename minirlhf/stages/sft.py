"""The pt and sft stages: next-token prediction, on packed documents (pt) or on the answers of
instruction data (sft, prompt tokens masked out of the loss by data.py).

NEFTune (Jain et al. 2023, Algorithm 1) adds uniform noise to the input embeddings while training:
    emb + U(-1, 1) * alpha / sqrt(L * d),   L = sequence length, d = embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minirlhf.batching import BatchIterator
from minirlhf.build import apply_lora, build_model, build_tokenizer
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.logprobs import causal_lm_loss
from minirlhf.losses import IGNORE_INDEX
from minirlhf.model import Transformer
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import PolicyStage
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import ConfigError, check, setting
from minirlhf.trainer import Trainer


@dataclass
class PTSection(StageSection):
    section = "pt"
    add_bos: bool = setting(False, "start every document with the tokenizer's BOS token (when it has one)")

    def longest_row(self, cfg: Config) -> tuple[int, str, str]:
        return cfg.data.block_size, "data", "block_size"


@dataclass
class SFTSection(StageSection):
    section = "sft"
    neftune_alpha: float = setting(0.0, "NEFTune noise scale alpha (Jain et al. 2023, Alg. 1); 0 = off")
    packing: bool = setting(False, "pack several examples into each block_size row (no attention across them)")

    def validate(self) -> None:
        check(self.neftune_alpha >= 0, self.section, "neftune_alpha", ">= 0", self.neftune_alpha)

    def validate_run(self, cfg: Config) -> None:
        if self.packing and cfg.data.cutoff_len > cfg.data.block_size:
            raise ConfigError(f"[data] cutoff_len must be <= block_size = {cfg.data.block_size} when "
                              f"[sft] packing = true, got {cfg.data.cutoff_len}", "data", "cutoff_len")

    def longest_row(self, cfg: Config) -> tuple[int, str, str]:
        if self.packing:
            return cfg.data.block_size, "data", "block_size"
        return cfg.data.cutoff_len, "data", "cutoff_len"


def neftune_hook(alpha: float):
    """A forward hook for the embedding that adds NEFTune noise in training mode only."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        L, d = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(L * d)
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


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

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = causal_lm_loss(self.model, batch)
        return loss, {"loss": loss.detach()}

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The trained labels (positions 1..T-1 not IGNORE_INDEX): the loss is their mean, and the trainer weights
        micro-batches by them, so a step is the mean over every trained token of its batch."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def chance_loss(self) -> float:
        """ln V: the cross-entropy of a uniform guess over the model's vocabulary."""
        return math.log(self.model.config.vocab_size)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Token-weighted mean loss over the eval examples, and its perplexity."""
        if not self.eval_examples:
            return {}
        total, count = 0.0, 0
        size = self.cfg.train.micro_batch_size
        for i in range(0, len(self.eval_examples), size):
            batch = trainer.to_device(self.collate(self.eval_examples[i: i + size]))
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += float(causal_lm_loss(self.model, batch)) * n
                count += n
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> LanguageModelingStage:
    """rank: under torchrun, only rank 0 reads the model (see build.build_model)."""
    tok = build_tokenizer(cfg)
    model = apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank))
    if cfg.stage == "pt":
        data = build_datasets(cfg, tok, SPECS["pt"].data_formats, add_bos=cfg.pt.add_bos)
    else:
        data = build_datasets(cfg, tok, SPECS["sft"].data_formats, pack=cfg.sft.packing)
    return LanguageModelingStage(cfg, model, tok, data.train, data.eval, data.collate)


SPECS = {
    "pt": StageSpec(PTSection, data_formats=("text",), build=build_stage, rank0_loading=True),
    "sft": StageSpec(SFTSection, data_formats=("alpaca", "sharegpt"), build=build_stage, rank0_loading=True),
}
