"""The dpo stage: direct preference optimisation and its relatives on (prompt, chosen, rejected) pairs.

[dpo] loss_type picks the objective (all formulas live in minirlhf/losses.py):

    sigmoid  DPO (Rafailov et al. 2023, eq. 7), with label_smoothing the conservative variant
    hinge    SLiC-HF calibration loss (Zhao et al. 2023)
    ipo      IPO (Azar et al. 2023, eq. 17) on length-averaged log-probs (TRL's convention)
    simpo    SimPO (Meng et al. 2024, eq. 6): length-averaged, no reference model
    orpo     ORPO (Hong et al. 2024, eqs. 6-7): the chosen answer's NLL plus an odds-ratio term, no
             reference model

Log-probs are sums over the answer tokens (labels != -100) of log pi(y_t | x, y_<t); chosen and rejected
run as one [2B, T] forward. Implicit rewards: beta * (log pi - log ref) for sigmoid/hinge/ipo (averaged
log-probs for ipo), beta * (average log pi) for simpo and orpo, which have no reference.

The reference (sigmoid, hinge, ipo), with `Reference` below:
  - [dpo] ref_model set: that model, frozen;
  - else with LoRA: the policy itself with its adapters disabled (no second copy of the weights);
  - else: a frozen copy of the starting model.
[dpo] reference = "precompute" runs the reference once over the train and eval pairs before training
and caches the log-probs in OUTPUT/reference_logps/<hash>.safetensors, keyed by a hash of the tokenized
pairs, the reference weights and the precision, so that a rerun or a resume reuses them and the
reference model is not held in memory while training. "live" recomputes them every step.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minirlhf.build import DTYPES, apply_lora, build_model, build_tokenizer, disable_dropout, load_model
from minirlhf.config import Config, ConfigError
from minirlhf.data import IGNORE_INDEX, BatchIterator, build_datasets
from minirlhf.distributed import reshard
from minirlhf.logprobs import label_logprobs
from minirlhf.lora import disable_adapters, has_lora
from minirlhf.losses import dpo_loss, orpo_loss, simpo_loss
from minirlhf.model import Transformer
from minirlhf.tokenizer import Tokenizer
from minirlhf.sft import PolicyStage
from minirlhf.trainer import autocast_for

logger = logging.getLogger(__name__)

REFERENCE_FREE = ("simpo", "orpo")
SIDES = ("chosen", "rejected")


# --------------------------------------------------------------------------------------------------
# shared with kto.py: precision, sequence log-probs, the reference model


def sequence_logps(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's labelled tokens, and how many there are.

    input_ids, attention_mask, labels: [B, T] (labels aligned with input_ids, -100 where untrained).
    Returns (sums [B] float32, counts [B] long). Goes through logprobs.label_logprobs (fused LM head).
    """
    token = label_logprobs(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)  # [B]
    return token.float().sum(-1), counts


def pair_logps(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected of a preference batch as one [2B, T] forward.

    Returns (sums [2B], counts [2B]): rows 0..B-1 are the chosen answers, B..2B-1 the rejected ones.
    """
    cat = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask",
                                                                                 "labels")}
    return sequence_logps(model, cat["input_ids"], cat["attention_mask"], cat["labels"])


class Reference:
    """The reference policy pi_ref: a frozen model, or the policy with its LoRA adapters disabled."""

    def __init__(self, model: Transformer, adapters_off: bool, source: str):
        self.model, self.adapters_off, self.source = model, adapters_off, source

    def context(self):
        if self.adapters_off:
            return disable_adapters(self.model)
        return nullcontext()

    def frozen_modules(self) -> list[Transformer]:
        """The reference's own model, when it has one (not when it is the policy with adapters off)."""
        return [] if self.adapters_off else [self.model]

    @torch.no_grad()
    def run(self, fn: Callable[[Transformer], torch.Tensor | tuple], *args):
        """fn(model, *args) under the reference, without gradient (eval mode for the duration). A sharded
        frozen reference gives its gathered weights back afterwards (distributed.reshard)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                return fn(self.model, *args)
        finally:
            self.model.train(was_training)
            if not self.adapters_off:
                reshard(self.model)

    def fingerprint(self) -> str:
        """A hash of the reference's weights as it runs (adapter tensors left out), for cache keys."""
        h = hashlib.blake2b(digest_size=16)
        for name, t in sorted(self.model.state_dict().items()):
            if self.adapters_off and re.search(r"(^|\.)(lora_A|lora_B|modules_to_save)\.", name):
                continue
            name = name.replace(".original_module", "")
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()


def build_reference(cfg: Config, policy: Transformer, ref_path: str, section: str,
                    device: torch.device | str, rank: int | None = None) -> Reference:
    """The reference of a policy (see the module docstring); call it before any training step.
    rank: under torchrun, only rank 0 reads a ref_model (see build.build_model)."""
    if ref_path:
        ref = load_model(ref_path, DTYPES[cfg.model.dtype], device, rank)
        if ref.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"[{section}] ref_model {ref_path!r} has a vocabulary of {ref.config.vocab_size}, "
                              f"the policy {policy.config.vocab_size}", section, "ref_model")
        source = ref_path
    elif has_lora(policy):
        return Reference(policy, adapters_off=True, source="the policy with its adapters disabled")
    else:
        ref = copy.deepcopy(policy)
        source = f"a frozen copy of {cfg.model.path or 'the fresh model'}"
    ref.requires_grad_(False)
    ref.eval()
    ref.kernel_backend = cfg.model.backend
    ref.activation_checkpointing = False
    return Reference(ref, adapters_off=False, source=source)


# --------------------------------------------------------------------------------------------------
# precomputed reference log-probs


def data_fingerprint(examples: Sequence[dict], keys: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        for k in keys:
            h.update(f"{k}:{','.join(map(str, e[k]))};".encode())
    return h.hexdigest()


def precompute_reference(reference: Reference, examples: Sequence[dict], collate, batch_size: int,
                         device: torch.device | str, autocast, cache_dir: Path, tag: str) -> torch.Tensor:
    """Summed reference log-probs of every pair: [N, 2] (chosen, rejected), from the cache when present.

    The cache file is cache_dir / f"{tag}-{key}.safetensors", key = hash(tokenized pairs, reference
    weights, precision); it is written atomically (temporary file, then rename).
    """
    keys = [f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels")]
    precision = str(getattr(autocast, "fast_dtype", "none"))
    key = hashlib.blake2b(f"{data_fingerprint(examples, keys)}|{reference.fingerprint()}|{precision}".encode(),
                          digest_size=12).hexdigest()
    path = cache_dir / f"{tag}-{key}.safetensors"
    if path.exists():
        logps = load_file(path)["logps"]
        if logps.shape == (len(examples), 2):
            logger.info("reference log-probs of %d %s pairs read from %s", len(examples), tag, path)
            return logps
    start = time.perf_counter()
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc=f"reference log-probs ({tag})", dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size]).items()}
        with autocast:
            sums, _ = reference.run(pair_logps, batch)
        out.append(sums.view(2, -1).t().float().cpu())  # [b, 2]
    logps = torch.cat(out) if out else torch.zeros(0, 2)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": logps.contiguous()}, tmp)
    os.replace(tmp, path)
    logger.info("reference log-probs of %d %s pairs computed in %.1fs with %s, cached in %s", len(examples), tag,
                time.perf_counter() - start, reference.source, path)
    return logps


def with_reference_logps(examples: Sequence[dict], logps: torch.Tensor) -> list[dict]:
    """Copies of the examples carrying their precomputed reference log-probs."""
    return [{**e, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
            for e, (c, r) in zip(examples, logps.tolist())]


def collate_with_reference(examples: Sequence[dict], collate) -> dict[str, torch.Tensor]:
    """data.collate_preference plus ref_chosen_logps, ref_rejected_logps [B] when the examples carry them."""
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
        sums, _ = self.reference.run(pair_logps, batch)
        B = batch["chosen_input_ids"].shape[0]
        return sums[:B], sums[B:]

    def loss(self, batch):
        B = batch["chosen_input_ids"].shape[0]
        d = self.cfg.dpo
        sums, counts = pair_logps(self.model, batch)  # [2B], [2B]
        avg = sums / counts.clamp(min=1)
        if self.loss_type in REFERENCE_FREE:
            if self.loss_type == "simpo":
                losses = simpo_loss(avg[:B], avg[B:], beta=d.beta, gamma=d.simpo_gamma)
            else:
                losses = orpo_loss(avg[:B], avg[B:], -avg[:B], beta=d.beta)
            chosen_rewards, rejected_rewards = d.beta * avg[:B].detach(), d.beta * avg[B:].detach()
        else:
            ref_c, ref_r = self.reference_logps(batch)
            policy = sums
            if self.loss_type == "ipo":
                ref_c, ref_r = ref_c / counts[:B].clamp(min=1), ref_r / counts[B:].clamp(min=1)
                policy = avg
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy[:B], policy[B:], ref_c.to(policy.dtype), ref_r.to(policy.dtype), beta=d.beta,
                loss_type=self.loss_type, label_smoothing=d.label_smoothing)
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": sums[:B].detach().mean(),
            "logps/rejected": sums[B:].detach().mean(),
        }
        if self.loss_type == "orpo":
            metrics["nll"] = -avg[:B].detach().mean()
        return loss, metrics

    def evaluate(self, trainer) -> dict[str, float]:
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
    data = build_datasets(cfg, tok)
    train, eval_ = data.train, data.eval
    if cfg.dpo.loss_type in REFERENCE_FREE:
        return PreferenceStage(cfg, model, tok, train, eval_, data.collate)
    reference = build_reference(cfg, model, cfg.dpo.ref_model, "dpo", device, rank=rank)
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
