"""The kto stage: Kahneman-Tversky optimisation on unpaired answers labelled desirable or undesirable.

Each example (x, y) has a label; with r = log pi(y|x) - log ref(y|x) and the reference point z0
(losses.kto_loss; Ethayarajh et al. 2024, eq. 8)

    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))

z0 estimates KL(pi || ref) from mismatched pairs of the same micro-batch (paper, sec. 4.1): data.collate_kto
pairs prompt i with the completion of example (i + 1) mod B, so for B >= 2 no pair stays matched, and

    z0 = max(0, mean_i [log pi(y_{i+1} | x_i) - log ref(y_{i+1} | x_i)]),   detached.

With B = 1 the "mismatched" pair is the example itself, so z0 = max(0, r) of that example: the reference
point then follows the example instead of estimating the KL (a desirable answer with r > 0 sits at
sigmoid(0) and is pushed only by the gradient through r). build_stage warns about micro_batch_size = 1,
and when the data size leaves a last micro-batch of one example the sampler drops incomplete batches
(the dropped examples change every epoch).

The paper recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] (sec. 4.2, "data imbalance");
build_stage warns outside that range and says which desirable_weight would bring it back.

The reference is the policy with its adapters disabled under LoRA, else a frozen copy of the starting
model (or [kto] ref_model); it runs live, because the KL pairs change with the shuffled batches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch

from minirlhf.build import apply_lora, build_model, build_tokenizer, disable_dropout
from minirlhf.config import Config
from minirlhf.data import IGNORE_INDEX, BatchIterator, build_datasets
from minirlhf.dpo import Reference, build_reference, sequence_logps
from minirlhf.losses import kto_loss
from minirlhf.model import Transformer
from minirlhf.tokenizer import Tokenizer
from minirlhf.sft import PolicyStage
from minirlhf.trainer import StepResult

logger = logging.getLogger(__name__)

CLASSES = ("desirable", "undesirable")
RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)


def weight_ratio(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> float:
    """lambda_D * n_D / (lambda_U * n_U) (inf when there are no undesirable examples)."""
    if n_undesirable == 0:
        return float("inf")
    return desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


def check_class_balance(n_desirable: int, n_undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """A warning when the weighted class ratio is outside the paper's [1, 4/3], else None."""
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return f"kto: the training data has no {missing} examples (label = {missing == 'desirable'})"
    ratio = weight_ratio(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    lo, hi = RECOMMENDED_RATIO
    if lo <= ratio <= hi:
        return None
    base = undesirable_weight * n_undesirable / n_desirable
    return (f"kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight:g} * "
            f"{n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3f} is outside [1, 4/3] "
            f"(Ethayarajh et al. 2024, sec. 4.2); [kto] desirable_weight in [{base * lo:.3g}, {base * hi:.3g}] "
            f"would bring it back")


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def stacked(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The examples and their KL pairs as one [2B, T] batch (rows B..2B-1 are the KL pairs)."""
    width = max(batch["input_ids"].shape[1], batch["kl_input_ids"].shape[1])
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([_pad_to(batch[k], width, v), _pad_to(batch[f"kl_{k}"], width, v)]) for k, v in fill.items()}


class KTOStage(PolicyStage):
    """One KTO step: policy log-probs with gradient, KL-pair log-probs and the reference without."""

    def __init__(self, cfg: Config, model: Transformer, tok: Tokenizer, train: list[dict], eval: list[dict],
                 collate, reference: Reference):
        self.cfg, self.model, self.tok, self.collate, self.reference = cfg, model, tok, collate, reference
        self.eval_examples = eval
        size = cfg.train.micro_batch_size
        drop_last = size > 1 and len(train) % size == 1 and len(train) > size
        self.batches = BatchIterator(train, size, collate, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                     drop_last=drop_last)

    def frozen_modules(self) -> list[Transformer]:
        """The reference's frozen model (none when the reference is the policy with adapters off)."""
        return self.reference.frozen_modules()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything the loss needs: policy [B] (with gradient), ref [B], and kl, the detached z0 input."""
        B = batch["input_ids"].shape[0]
        policy, _ = sequence_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            kl_policy, _ = sequence_logps(self.model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                          batch["kl_labels"])
        both = stacked(batch, self.tok.pad_id)
        ref, _ = self.reference.run(sequence_logps, both["input_ids"], both["attention_mask"], both["labels"])
        kl = (kl_policy - ref[B:]).mean()  # clamped at 0 (and detached) inside kto_loss
        return {"policy": policy, "ref": ref[:B], "kl": kl}

    def loss(self, batch):
        k = self.cfg.kto
        out = self.forward(batch)
        losses = kto_loss(out["policy"], out["ref"], batch["desirable"], out["kl"], beta=k.beta,
                          desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
        loss = losses.mean()
        return loss, {"loss": loss.detach(), "kl": out["kl"].detach(),
                      **self._class_sums(out, batch["desirable"])}

    def _class_sums(self, out: dict[str, torch.Tensor], desirable: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-class sums and counts ("_sum/..", "_count/.."); `class_means` turns them into means after
        averaging over micro-batches, so a micro-batch without one class does not bias its mean."""
        rewards = self.cfg.kto.beta * (out["policy"] - out["ref"]).detach()
        logps = out["policy"].detach()
        sums = {}
        for name, rows in zip(CLASSES, (desirable.bool(), ~desirable.bool())):
            m = rows.to(rewards.dtype)
            sums[f"_count/{name}"] = m.sum()
            sums[f"_sum/rewards/{name}"] = (rewards * m).sum()
            sums[f"_sum/logps/{name}"] = (logps * m).sum()
        return sums

    @staticmethod
    def class_means(metrics: dict[str, float]) -> dict[str, float]:
        """Replace the per-class sums and counts by means (classes that did not occur are left out)."""
        out = {k: v for k, v in metrics.items() if not k.startswith("_")}
        for name in CLASSES:
            n = metrics.get(f"_count/{name}", 0.0)
            if n > 0:
                for what in ("rewards", "logps"):
                    out[f"{what}/{name}"] = metrics[f"_sum/{what}/{name}"] / n
        if "rewards/desirable" in out and "rewards/undesirable" in out:
            out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out

    def train_step(self, trainer) -> StepResult:
        result = super().train_step(trainer)
        return StepResult(self.class_means(result.metrics), result.tokens)

    def eval_chunks(self) -> list[Sequence[dict]]:
        """Eval micro-batches in order; a last chunk of one example joins the one before it (a batch of
        one would pair the example with itself for the KL estimate)."""
        size, n = self.cfg.train.micro_batch_size, len(self.eval_examples)
        bounds = list(range(0, n, max(size, 2))) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            bounds.pop(-2)
        return [self.eval_examples[a:b] for a, b in itertools.pairwise(bounds)]

    def evaluate(self, trainer) -> dict[str, float]:
        """Example-weighted loss and kl, and per-class means over the eval examples."""
        if not self.eval_examples:
            return {}
        totals: dict[str, float] = {}
        for chunk in self.eval_chunks():
            _, metrics = self.loss(trainer.to_device(self.collate(chunk)))
            for k, v in metrics.items():
                w = 1.0 if k.startswith("_") else len(chunk)
                totals[k] = totals.get(k, 0.0) + float(v) * w
        n = len(self.eval_examples)
        return self.class_means({k: v if k.startswith("_") else v / n for k, v in totals.items()})


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> KTOStage:
    """rank: under torchrun, only rank 0 reads the policy and ref_model (see build.build_model)."""
    tok = build_tokenizer(cfg)
    model = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank)))
    data = build_datasets(cfg, tok)
    k = cfg.kto
    n_d = sum(1 for e in data.train if e["desirable"])
    warning = check_class_balance(n_d, len(data.train) - n_d, k.desirable_weight, k.undesirable_weight)
    if warning:
        logger.warning(warning)
    if cfg.train.micro_batch_size == 1:
        logger.warning("kto: micro_batch_size = 1 pairs each prompt with its own completion, so the KL reference "
                       "point is max(0, r) of the example itself rather than a KL estimate; use >= 2")
    reference = build_reference(cfg, model, k.ref_model, "kto", device, rank=rank)
    logger.info("kto: reference = %s", reference.source)
    return KTOStage(cfg, model, tok, data.train, data.eval, data.collate, reference)
