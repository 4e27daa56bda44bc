"""The dpo stage: direct preference optimisation and its relatives on (prompt, chosen, rejected) pairs.

[dpo] loss_type picks the objective (all formulas live in minirlhf/losses.py):

    sigmoid  DPO (Rafailov et al. 2023, eq. 7), with label_smoothing the conservative variant
    hinge    SLiC-HF calibration loss (Zhao et al. 2023)
    ipo      IPO (Azar et al. 2023, eq. 17) on length-averaged log-probs (TRL's convention)
    simpo    SimPO (Meng et al. 2024, eq. 6): length-averaged, no reference model
    orpo     ORPO (Hong et al. 2024, eqs. 6-7): the chosen answer's NLL plus an odds-ratio term, no
             reference model

Log-probs are sums over the answer tokens (labels != -100) of log pi(y_t | x, y_<t); chosen and rejected
run as one [2B, T] forward. Implicit rewards: beta * (log pi - log ref) on the summed log-probs for
sigmoid/hinge/ipo (for ipo too, although its loss takes averages: TRL's DPOTrainer does the same), and
beta * (average log pi) for simpo and orpo, which have no reference. Metrics carry TRL's names:
rewards/chosen, rewards/rejected, rewards/accuracies (mean of [reward_chosen > reward_rejected]),
rewards/margins (mean of reward_chosen - reward_rejected), logps/chosen, logps/rejected (summed log-probs).

The reference (sigmoid, hinge, ipo) is stages/common.py's `Reference`: [dpo] ref_model, else the policy
with its adapters disabled under LoRA, else a frozen copy of the starting model.
[dpo] reference = "precompute" runs the reference once over the train and eval pairs before training
and caches the log-probs in OUTPUT/reference_logps/<hash>.safetensors, keyed by a hash of the tokenized
pairs, the reference weights and the precision, so that a rerun or a resume reuses them and the
reference model is not held in memory while training. "live" recomputes them every step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from minirlhf.batching import BatchIterator
from minirlhf.build import (
    apply_lora,
    build_model,
    build_tokenizer,
    disable_dropout,
)
from minirlhf.checkpointing import fsync_files
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.hf_checkpoint import save_safetensors
from minirlhf.logprobs import pair_logprobs
from minirlhf.losses import dpo_loss, orpo_loss, simpo_loss
from minirlhf.model import Transformer
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import PolicyStage, Reference, build_reference
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import ConfigError, check, check_choice, setting, toml_value
from minirlhf.trainer import Trainer, autocast_for

logger = logging.getLogger(__name__)

@dataclass
class DPOSection(StageSection):
    section = "dpo"
    loss_type: str = setting("sigmoid", "sigmoid (DPO) | hinge (SLiC) | ipo | simpo | orpo")
    beta: float = setting(0.1, "inverse temperature of the implicit reward (orpo: weight lambda of the odds-ratio "
                               "term)")
    label_smoothing: float = setting(0.0, "conservative DPO: assumed probability that a label is flipped "
                                          "(sigmoid only)")
    simpo_gamma: float = setting(0.5, "SimPO target reward margin gamma (Meng et al. 2024, eq. 6)")
    reference: str = setting("precompute", "reference log-probs: precompute (one pass before training) | live")
    ref_model: str = setting("", "reference model directory; empty = the starting model ([model] path)", path=True)

    def validate(self) -> None:
        s = self.section
        check_choice(s, "loss_type", self.loss_type, ("sigmoid", "hinge", "ipo", "simpo", "orpo"))
        check(self.beta > 0, s, "beta", "> 0", self.beta)
        check(0.0 <= self.label_smoothing < 0.5, s, "label_smoothing", "in [0, 0.5)", self.label_smoothing)
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ConfigError(f"[{s}] label_smoothing must be 0 unless loss_type = \"sigmoid\", got "
                              f"{toml_value(self.label_smoothing)} with loss_type = "
                              f"{toml_value(self.loss_type)}", s, "label_smoothing")
        check(self.simpo_gamma >= 0, s, "simpo_gamma", ">= 0", self.simpo_gamma)
        check_choice(s, "reference", self.reference, ("precompute", "live"))


REFERENCE_FREE = ("simpo", "orpo")
SIDES = ("chosen", "rejected")


# --------------------------------------------------------------------------------------------------
# precomputed reference log-probs


def data_fingerprint(examples: Sequence[dict], keys: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        for k in keys:
            h.update(f"{k}:{','.join(map(str, e[k]))};".encode())
    return h.hexdigest()


def _checksum(logps: torch.Tensor) -> str:
    return hashlib.blake2b(logps.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def read_cached_logps(path: Path, rows: int) -> torch.Tensor | None:
    """The [rows, 2] float32 log-probs cached in `path`, or None (with a warning) when the file cannot be used:
    unreadable, truncated, another layout, or bytes that no longer match the checksum written with them.

    A safetensors file: a JSON header and raw bytes, read without unpickling anything.
    """
    try:
        with safe_open(path, framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
            logps = f.get_tensor("logps") if names == ["logps"] else None
    except (OSError, SafetensorError) as e:
        problem = f"unreadable ({e})"
    else:
        if logps is None or logps.dtype != torch.float32 or tuple(logps.shape) != (rows, 2):
            shown = "no 'logps' tensor" if logps is None else f"{logps.dtype} {tuple(logps.shape)}"
            problem = f"holds {shown}, expected float32 ({rows}, 2)"
        elif meta.get("blake2b") != _checksum(logps):
            problem = "its bytes do not match their checksum"
        else:
            return logps
    logger.warning("%s: reference log-prob cache %s; recomputing it", path, problem)
    return None


def precompute_reference(reference: Reference, examples: Sequence[dict], collate, batch_size: int,
                         device: torch.device | str, autocast, cache_dir: Path, tag: str) -> torch.Tensor:
    """Summed reference log-probs of every pair: [N, 2] (chosen, rejected), from the cache when present.

    The cache file is cache_dir / f"{tag}-{key}.safetensors", key = hash(tokenized pairs, reference
    weights, precision), with a checksum of its tensor in the metadata; it is written atomically (temporary
    file, fsync, rename), and one that cannot be used (`read_cached_logps`) is recomputed and replaced.
    """
    keys = [f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels")]
    precision = str(getattr(autocast, "fast_dtype", "none"))
    key = hashlib.blake2b(f"{data_fingerprint(examples, keys)}|{reference.fingerprint()}|{precision}".encode(),
                          digest_size=12).hexdigest()
    path = cache_dir / f"{tag}-{key}.safetensors"
    if path.exists():
        logps = read_cached_logps(path, len(examples))
        if logps is not None:
            logger.info("reference log-probs of %d %s pairs read from %s", len(examples), tag, path)
            return logps
    start = time.perf_counter()
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc=f"reference log-probs ({tag})", dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size]).items()}
        with autocast:
            sums, _ = reference.run(pair_logprobs, batch)
        out.append(sums.view(2, -1).t().float().cpu())  # [b, 2]
    logps = (torch.cat(out) if out else torch.zeros(0, 2)).contiguous()
    took = time.perf_counter() - start
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors({"logps": logps}, tmp, metadata={"blake2b": _checksum(logps)})
        fsync_files([tmp])
        os.replace(tmp, path)
    except OSError as e:  # the cache only saves time: a run whose output_dir cannot hold it goes on without
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        logger.warning("reference log-probs of %d %s pairs computed in %.1fs but not cached (%s: %s)",
                       len(examples), tag, took, cache_dir, e.strerror or e)
        return logps
    logger.info("reference log-probs of %d %s pairs computed in %.1fs with %s, cached in %s", len(examples), tag,
                took, reference.source, path)
    return logps


def with_reference_logps(examples: Sequence[dict], logps: torch.Tensor) -> list[dict]:
    """Copies of the examples carrying their precomputed reference log-probs."""
    return [{**e, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
            for e, (c, r) in zip(examples, logps.tolist())]


def collate_with_reference(examples: Sequence[dict], collate) -> dict[str, torch.Tensor]:
    """batching.collate_preference plus ref_chosen_logps, ref_rejected_logps [B] when the examples carry them."""
    batch = collate(examples)
    if "ref_chosen_logps" in examples[0]:
        for s in SIDES:
            batch[f"ref_{s}_logps"] = torch.tensor([e[f"ref_{s}_logps"] for e in examples], dtype=torch.float32)
    return batch


# --------------------------------------------------------------------------------------------------
# the stage


class PreferenceStage(PolicyStage):
    """One step of the dpo family on a micro-batch of preference pairs."""

    def __init__(self, cfg: Config, model: Transformer, tok: Tokenizer, train: list[dict], eval: list[dict],
                 collate, reference: Reference | None = None):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.loss_type = cfg.dpo.loss_type
        if self.loss_type not in REFERENCE_FREE and reference is None and "ref_chosen_logps" not in train[0]:
            raise ValueError(f"dpo: loss_type {self.loss_type!r} needs a reference model or precomputed "
                             f"reference log-probs")
        self.reference = reference
        self.collate = functools.partial(collate_with_reference, collate=collate)
        self.eval_examples = eval
        self.batches = BatchIterator(train, cfg.train.micro_batch_size, self.collate, seed=cfg.data.seed,
                                     shuffle=cfg.data.shuffle)

    def frozen_modules(self) -> list[nn.Module]:
        """The live reference's frozen model (none when precomputed, reference-free or adapters-off)."""
        return self.reference.frozen_modules() if self.reference is not None else []

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs ([B] chosen, [B] rejected): precomputed, or run now."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        sums, _ = self.reference.run(pair_logprobs, batch)
        B = batch["chosen_input_ids"].shape[0]
        return sums[:B], sums[B:]

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = batch["chosen_input_ids"].shape[0]
        d = self.cfg.dpo
        sums, counts = pair_logprobs(self.model, batch)  # [2B], [2B]
        avg = sums / counts.clamp(min=1)
        if self.loss_type in REFERENCE_FREE:
            if self.loss_type == "simpo":
                losses = simpo_loss(avg[:B], avg[B:], beta=d.beta, gamma=d.simpo_gamma)
            else:
                losses = orpo_loss(avg[:B], avg[B:], -avg[:B], beta=d.beta)
            chosen_rewards, rejected_rewards = d.beta * avg[:B].detach(), d.beta * avg[B:].detach()
        else:
            ref_c, ref_r = (r.to(sums.dtype) for r in self.reference_logps(batch))
            if self.loss_type == "ipo":  # averaged over each answer's tokens (TRL's convention)
                losses, _, _ = dpo_loss(avg[:B], avg[B:], ref_c / counts[:B].clamp(min=1),
                                        ref_r / counts[B:].clamp(min=1), beta=d.beta, loss_type="ipo")
                chosen_rewards, rejected_rewards = d.beta * (sums[:B] - ref_c), d.beta * (sums[B:] - ref_r)
            else:
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    sums[:B], sums[B:], ref_c, ref_r, beta=d.beta, loss_type=self.loss_type,
                    label_smoothing=d.label_smoothing)
            chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": sums[:B].detach().mean(),
            "logps/rejected": sums[B:].detach().mean(),
        }
        if self.loss_type == "orpo":
            metrics["nll"] = -avg[:B].detach().mean()
        return loss, metrics

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Pair-weighted means of the step's metrics over the eval pairs."""
        if not self.eval_examples:
            return {}
        size = self.cfg.train.micro_batch_size
        totals: dict[str, float] = {}
        for i in range(0, len(self.eval_examples), size):
            chunk = self.eval_examples[i: i + size]
            _, metrics = self.loss(trainer.to_device(self.collate(chunk)))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
        return {k: v / len(self.eval_examples) for k, v in totals.items()}


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> PreferenceStage:
    """rank: under torchrun, only rank 0 reads the policy and ref_model (see build.build_model), unless
    the reference log-probs are precomputed here, which needs the weights on every rank."""
    if not (cfg.dpo.loss_type in REFERENCE_FREE or cfg.dpo.reference == "live"):
        rank = None
    tok = build_tokenizer(cfg)
    model = disable_dropout(cfg, apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank)))
    data = build_datasets(cfg, tok, SPECS["dpo"].data_formats)
    train, eval_ = data.train, data.eval
    if cfg.dpo.loss_type in REFERENCE_FREE:
        return PreferenceStage(cfg, model, tok, train, eval_, data.collate)
    reference = build_reference(cfg, tok, model, cfg.dpo.ref_model, "dpo", device, rank=rank)
    logger.info("dpo: reference = %s (%s)", reference.source, cfg.dpo.reference)
    if cfg.dpo.reference == "live":
        return PreferenceStage(cfg, model, tok, train, eval_, data.collate, reference)
    cache = Path(cfg.train.output_dir) / "reference_logps"
    parts = {"train": train, "eval": eval_}
    for tag, examples in parts.items():
        if examples:
            logps = precompute_reference(reference, examples, data.collate, cfg.train.micro_batch_size, device,
                                         autocast_for(cfg.train.precision, device), cache, tag)
            parts[tag] = with_reference_logps(examples, logps)
    del reference  # a loaded or copied reference model is freed here; only its log-probs are kept
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return PreferenceStage(cfg, model, tok, parts["train"], parts["eval"], data.collate)


SPECS = {"dpo": StageSpec(DPOSection, data_formats=("preference",), build=build_stage, rank0_loading=True)}
