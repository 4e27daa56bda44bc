"""The kto stage: Kahneman-Tversky optimisation on unpaired answers labelled desirable or undesirable.

Each example (x, y) has a label; with r = log pi(y|x) - log ref(y|x) and the reference point z0
(losses.kto_loss; Ethayarajh et al. 2024, eq. 8)

    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))

z0 estimates KL(pi || ref) from mismatched pairs of the same micro-batch (paper, sec. 4.1): batching.collate_kto
pairs prompt i with the completion of example (i + 1) mod B, so for B >= 2 no pair stays matched, and

    z0 = max(0, mean_i [log pi(y_{i+1} | x_i) - log ref(y_{i+1} | x_i)]),   detached,

the mean taken over the pairs of every rank under torchrun (`reference_point`), as TRL's KTOTrainer
gathers it across processes, so that all ranks use one z0.

With B = 1 the "mismatched" pair is the example itself, so z0 = max(0, r) of that example: the reference
point then follows the example instead of estimating the KL (a desirable answer with r > 0 sits at
sigmoid(0) and is pushed only by the gradient through r). build_stage warns about micro_batch_size = 1,
and when the data size leaves a last micro-batch of one example the sampler drops incomplete batches
(the dropped examples change every epoch).

The paper recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] (sec. 4.2, "data imbalance");
build_stage warns outside that range and says which desirable_weight would bring it back. With
[kto] balanced_batches (default) every micro-batch holds the two classes in the data's proportion
(batching.StratifiedSampler), as the KTO authors' loader interleaves them; TRL shuffles plainly, and then a
micro-batch's class count, and with it the weighted pull on what all answers share, varies from step to step.

The reference is the policy with its adapters disabled under LoRA, else a frozen copy of the starting
model (or [kto] ref_model); it runs live, because the KL pairs change with the shuffled batches.

Metrics carry TRL's names: `kl` (z0, after the clamp), `rewards/chosen` and `logps/chosen` (means over the
desirable examples; rewards = beta * r), `rewards/rejected` and `logps/rejected` (undesirable),
`rewards/margins` (chosen minus rejected), and `kl_estimate`, the mismatched-pair mean before the clamp.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minirlhf.batching import BatchIterator, pad_to
from minirlhf.build import apply_lora, build_model, build_tokenizer, disable_dropout
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.distributed import gather_cat
from minirlhf.logprobs import sequence_logprobs
from minirlhf.losses import IGNORE_INDEX, kto_loss
from minirlhf.model import Transformer
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import PolicyStage, Reference, build_reference
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import check, setting
from minirlhf.trainer import Trainer

logger = logging.getLogger(__name__)

@dataclass
class KTOSection(StageSection):
    section = "kto"
    beta: float = setting(0.1, "inverse temperature of the implicit reward (Ethayarajh et al. 2024, eq. 8)")
    desirable_weight: float = setting(1.0, "lambda_D, weight of desirable examples")
    undesirable_weight: float = setting(1.0, "lambda_U, weight of undesirable examples")
    balanced_batches: bool = setting(True, "every micro-batch holds desirable and undesirable examples in the data's "
                                           "proportion (as the KTO authors' loader); false = plain shuffle (as TRL)")
    ref_model: str = setting("", "reference model directory; empty = the starting model ([model] path)", path=True)

    def validate(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            check(getattr(self, key) > 0, self.section, key, "> 0", getattr(self, key))


CLASSES = {"chosen": True, "rejected": False}  # TRL's metric name of each class -> its label
POOLED = ("sum/", "count/")  # metric keys that reduce_metrics turns into per-class means
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


def reference_point(kl_policy: torch.Tensor, kl_ref: torch.Tensor, gather=gather_cat) -> torch.Tensor:
    """The estimate behind z0, before the clamp: the mean of log pi(y'|x) - log ref(y'|x) over the mismatched
    pairs of this micro-batch on every rank. kl_policy, kl_ref: [B] -> scalar, detached.

    `gather` concatenates a [2] tensor of each rank in rank order (distributed.gather_cat: the tensor itself
    in a plain process); sums and counts are pooled, so ranks with unequal micro-batches weigh by pairs.
    """
    diff = (kl_policy - kl_ref).detach().float()
    stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])  # [2]
    total, count = gather(stats).view(-1, 2).sum(0)
    return total / count


def stacked(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The examples and their KL pairs as one [2B, T] batch (rows B..2B-1 are the KL pairs)."""
    width = max(batch["input_ids"].shape[1], batch["kl_input_ids"].shape[1])
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([pad_to(batch[k], width, v), pad_to(batch[f"kl_{k}"], width, v)]) for k, v in fill.items()}


class KTOStage(PolicyStage):
    """One KTO step: policy log-probs with gradient, KL-pair log-probs and the reference without."""

    gather = staticmethod(gather_cat)  # the collective behind reference_point (tests put a fake one here)

    def __init__(self, cfg: Config, model: Transformer, tok: Tokenizer, train: list[dict], eval: list[dict],
                 collate, reference: Reference):
        self.cfg, self.model, self.tok, self.collate, self.reference = cfg, model, tok, collate, reference
        self.eval_examples = eval
        size = cfg.train.micro_batch_size
        drop_last = size > 1 and len(train) % size == 1 and len(train) > size
        strata = [e["desirable"] for e in train] if cfg.kto.balanced_batches else None
        self.batches = BatchIterator(train, size, collate, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                     drop_last=drop_last, strata=strata)

    def frozen_modules(self) -> list[Transformer]:
        """The reference's frozen model (none when the reference is the policy with adapters off)."""
        return self.reference.frozen_modules()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything the loss needs: policy [B] (with gradient), ref [B], and kl, the detached estimate
        behind z0 (before the clamp, over every rank's pairs)."""
        B = batch["input_ids"].shape[0]
        policy, _ = sequence_logprobs(self.model, batch)
        with torch.no_grad():
            kl_pairs = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
            kl_policy, _ = sequence_logprobs(self.model, kl_pairs)
        ref, _ = self.reference.run(sequence_logprobs, stacked(batch, self.tok.pad_id))
        return {"policy": policy, "ref": ref[:B], "kl": reference_point(kl_policy, ref[B:], self.gather)}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = self.cfg.kto
        out = self.forward(batch)
        losses = kto_loss(out["policy"], out["ref"], batch["desirable"], out["kl"], beta=k.beta,
                          desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
        loss = losses.mean()
        return loss, {"loss": loss.detach(), "kl": out["kl"].clamp(min=0), "kl_estimate": out["kl"],
                      **self._class_sums(out, batch["desirable"])}

    def _class_sums(self, out: dict[str, torch.Tensor], desirable: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-class sums and counts ("sum/rewards/chosen", "count/chosen" ...), which `reduce_metrics` turns
        into means once the step's micro-batches (and ranks) are pooled, so that a micro-batch holding few
        or none of a class does not bias its mean."""
        rewards = self.cfg.kto.beta * (out["policy"] - out["ref"]).detach()
        logps = out["policy"].detach()
        sums = {}
        for name, label in CLASSES.items():
            m = (desirable.bool() == label).to(rewards.dtype)
            sums[f"count/{name}"] = m.sum()
            sums[f"sum/rewards/{name}"] = (rewards * m).sum()
            sums[f"sum/logps/{name}"] = (logps * m).sum()
        return sums

    @staticmethod
    def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """The per-class sums and counts replaced by means: pooled over the step's micro-batches and, under
        torchrun, all ranks (the trainer's mean over ranks scales sums and counts alike), so every rank logs
        the same keys and values. A class that did not occur is left out."""
        out = {k: v for k, v in metrics.items() if not k.startswith(POOLED)}
        for name in CLASSES:
            n = metrics.get(f"count/{name}", 0.0)
            if n > 0:
                for what in ("rewards", "logps"):
                    out[f"{what}/{name}"] = metrics[f"sum/{what}/{name}"] / n
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def eval_chunks(self) -> list[Sequence[dict]]:
        """Eval micro-batches in order; a last chunk of one example joins the one before it (a batch of
        one would pair the example with itself for the KL estimate)."""
        size, n = self.cfg.train.micro_batch_size, len(self.eval_examples)
        bounds = list(range(0, n, max(size, 2))) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            bounds.pop(-2)
        return [self.eval_examples[a:b] for a, b in itertools.pairwise(bounds)]

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Example-weighted loss and kl, and per-class means over the eval examples (every rank evaluates
        them all, so the gathers inside `loss` pair up)."""
        if not self.eval_examples:
            return {}
        totals: dict[str, float] = {}
        for chunk in self.eval_chunks():
            _, metrics = self.loss(trainer.to_device(self.collate(chunk)))
            for k, v in metrics.items():
                w = 1.0 if k.startswith(POOLED) else len(chunk)
                totals[k] = totals.get(k, 0.0) + float(v) * w
        n = len(self.eval_examples)
        return self.reduce_metrics({k: v if k.startswith(POOLED) else v / n for k, v in totals.items()})


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> KTOStage:
    """rank: under torchrun, only rank 0 reads the policy and ref_model (see build.build_model)."""
    tok = build_tokenizer(cfg)
    model = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank)))
    data = build_datasets(cfg, tok, SPECS["kto"].data_formats)
    k = cfg.kto
    n_d = sum(1 for e in data.train if e["desirable"])
    warning = check_class_balance(n_d, len(data.train) - n_d, k.desirable_weight, k.undesirable_weight)
    if warning:
        logger.warning(warning)
    if cfg.train.micro_batch_size == 1:
        logger.warning("kto: micro_batch_size = 1 pairs each prompt with its own completion, so the KL reference "
                       "point is max(0, r) of the example itself rather than a KL estimate; use >= 2")
    reference = build_reference(cfg, tok, model, k.ref_model, "kto", device, rank=rank)
    logger.info("kto: reference = %s", reference.source)
    return KTOStage(cfg, model, tok, data.train, data.eval, data.collate, reference)


SPECS = {"kto": StageSpec(KTOSection, data_formats=("kto",), build=build_stage, rank0_loading=True)}
