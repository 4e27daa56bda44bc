"""The rm stage: a reward model trained on pairwise preferences.

A pair (x, y_c, y_r) has a preferred answer y_c and a dispreferred one y_r. The model scores each
sequence at its last real token (heads.RewardModel) and is trained so that r_c = r(x, y_c) exceeds
r_r = r(x, y_r) (Bradley-Terry; losses.reward_pair_loss):

    L = -log sigmoid(r_c - r_r - m)  +  c * mean((r_c + r_r)^2)

m is an optional per-pair margin ([rm] margin_field; Llama 2, Touvron et al. 2023, eq. 2) and the second
term, weighted by [rm] center_rewards_coef, keeps the rewards centred on zero without changing which
answer wins (Eisenstein et al. 2023, "Helping or Herding?"): the pairwise loss only sees r_c - r_r,
so without it the scores can drift by any constant.

Chosen and rejected run as one [2B, T] forward. At the end, one pass over the training data (no
gradient) records the mean and std of all 2N scores in the saved config.json, which ppo's
`reward_norm = "rm"` reads. With LoRA the backbone gets adapters and the scalar head trains in full (like PEFT's
modules_to_save); the saved reward model is the merged backbone plus the head, a plain
`*ForSequenceClassification` directory that ppo and transformers load without the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.batching import BatchIterator
from minirlhf.build import DTYPES, apply_lora, build_tokenizer, disable_dropout, fresh_model_config, prepare_backbone
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.heads import RewardModel
from minirlhf.losses import reward_centering_loss, reward_pair_loss
from minirlhf.stages import StageSection, StageSpec
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import check, check_choice, setting
from minirlhf.trainer import Stage, Trainer

logger = logging.getLogger(__name__)


@dataclass
class RMSection(StageSection):
    section = "rm"
    loss: str = setting("log_sig", "pairwise loss: log_sig = -log sigmoid(r_c - r_r - m) (InstructGPT eq. 1), "
                                   "log_exp = log(1 + exp(r_r - r_c + m))")
    margin_field: str = setting("", "column with a per-pair margin m (Llama 2 eq. 2); empty = no margin")
    center_rewards_coef: float = setting(0.0, "weight of the (r_c + r_r)^2 penalty keeping rewards centred "
                                              "(Eisenstein et al. 2023); 0 = off")

    def validate(self) -> None:
        check_choice(self.section, "loss", self.loss, ("log_sig", "log_exp"))
        check(self.center_rewards_coef >= 0, self.section, "center_rewards_coef", ">= 0",
              self.center_rewards_coef)


def pair_scores(model: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of both sides of a preference batch in one [2B, T] forward.

    batch: chosen_/rejected_ input_ids, attention_mask [B, T] -> (r_c [B], r_r [B]) float32.
    """
    B = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # [2B, T]
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # [2B, T]
    scores = model(ids, mask)  # [2B]
    return scores[:B], scores[B:]


def build_reward_model(cfg: Config, tok: Tokenizer, device: torch.device | str = "cpu") -> RewardModel:
    """[model] path as a reward model: a saved one as it is, a causal LM with a fresh head (seeded by
    [train] seed); no path = a fresh model of [model.init] shape. LoRA ([lora] enabled) goes on the
    backbone only, so the head stays trainable; with [train] disable_dropout (the default, as TRL's
    RewardConfig) its dropout is off."""
    if cfg.model.path:
        model = RewardModel.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype], device=device,
                                            seed=cfg.train.seed, new_head=True)
    else:
        torch.manual_seed(cfg.train.seed)
        model = RewardModel(fresh_model_config(cfg, tok)).to(device)
    prepare_backbone(cfg, tok, model.backbone, cfg.model.path)
    disable_dropout(cfg, apply_lora(cfg, model.backbone))
    return model


class RewardStage(Stage):
    """Pairwise reward-model training; metrics accuracy (r_c > r_r) and margin mean(r_c - r_r)."""

    def __init__(self, cfg: Config, model: RewardModel, tok: Tokenizer, train: list[dict], eval: list[dict],
                 collate):
        self.cfg, self.model, self.tok, self.collate = cfg, model, tok, collate
        self.train_examples, self.eval_examples = train, eval
        self.batches = BatchIterator(train, cfg.train.micro_batch_size, collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle)
        if cfg.rm.margin_field:
            logger.info("rm: margins from column %r", cfg.rm.margin_field)

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of scores (see the module docstring) and its detached metrics."""
        rm = self.cfg.rm
        loss = reward_pair_loss(chosen, rejected, kind=rm.loss, margin=margin)
        if rm.center_rewards_coef > 0:
            loss = loss + rm.center_rewards_coef * reward_centering_loss(chosen, rejected)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"loss": loss.detach(), "accuracy": (c > r).float().mean(), "margin": (c - r).mean(),
                   "rewards/chosen": c.mean(), "rewards/rejected": r.mean()}
        return loss, metrics

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_scores(self.model, batch)
        return self.pair_loss(chosen, rejected, batch.get("margin") if self.cfg.rm.margin_field else None)

    @torch.no_grad()
    def score_examples(self, model: RewardModel, examples: Sequence[dict], device: torch.device | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores by `model` of every example in order, in micro-batches without gradient: ([N], [N]) on the
        CPU."""
        device = device or next(model.parameters()).device
        size = self.cfg.train.micro_batch_size
        chosen, rejected = [], []
        for i in range(0, len(examples), size):
            batch = {k: v.to(device) for k, v in self.collate(examples[i: i + size]).items()}
            c, r = pair_scores(model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Pair-weighted loss, accuracy and margin over the eval pairs."""
        if not self.eval_examples:
            return {}
        chosen, rejected = self.score_examples(self.model, self.eval_examples, trainer.device)
        margin = None
        if self.cfg.rm.margin_field:
            margin = torch.tensor([e["margin"] for e in self.eval_examples], dtype=torch.float32)
        _, metrics = self.pair_loss(chosen, rejected, margin)
        return {k: float(v) for k, v in metrics.items()}

    def record_reward_stats(self, model: RewardModel) -> tuple[float, float]:
        """Mean and std of `model`'s scores of both answers of every training pair, kept on the model (and so
        in the saved config.json) for ppo's normalisation."""
        was_training = model.training
        model.eval()
        chosen, rejected = self.score_examples(model, self.train_examples)
        model.train(was_training)
        scores = torch.cat([chosen, rejected])  # [2N]
        model.reward_mean = float(scores.mean())
        model.reward_std = float(scores.std()) if scores.numel() > 1 else 1.0
        return model.reward_mean, model.reward_std

    def save_final(self, out_dir: Path, model: RewardModel) -> None:
        """The reward model in HF `*ForSequenceClassification` format (LoRA merged into the backbone, in
        place) plus the tokenizer files, with a pad token transformers can tell from the end token
        (heads.export_pad_id); first the score statistics of the training data (`record_reward_stats`)."""
        from minirlhf.lora import has_lora, merge_and_unload

        mean, std = self.record_reward_stats(model)
        logger.info("rm: training-set scores mean %.4f std %.4f", mean, std)
        if has_lora(model.backbone):
            merge_and_unload(model.backbone)
        model.save_pretrained(out_dir, tokenizer=self.tok)


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> RewardStage:
    """rank: unused, every rank loads the reward model (see build.build_model)."""
    tok = build_tokenizer(cfg)
    model = build_reward_model(cfg, tok, device)
    data = build_datasets(cfg, tok, SPECS["rm"].data_formats, margin_field=cfg.rm.margin_field)
    return RewardStage(cfg, model, tok, data.train, data.eval, data.collate)


SPECS = {"rm": StageSpec(RMSection, data_formats=("preference",), build=build_stage)}
