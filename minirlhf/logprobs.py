"""From a decoder and a batch to what the losses consume: next-token cross-entropy and per-token
log-probs of the labels.

Both go through the fused LM-head kernels (minirlhf/kernels), so the [B, T, V] logits are never
materialised; a LoRA-adapted head is fused as W + s B A (see `fused_head_weight`).
Labels are aligned with input_ids (labels[t] is the token at t, -100 where not trained); the shift
to "position t predicts token t+1" happens here and only here.
"""

from __future__ import annotations

import torch

from minirlhf import kernels
from minirlhf.kernels.fused_cross_entropy import cpu_chunk_size
from minirlhf.lora import LoRALinear, effective_weight
from minirlhf.losses import IGNORE_INDEX, entropy_from_logits, lm_loss, token_logps
from minirlhf.model import Transformer


def _shifted(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of positions 0..T-2 and the labels they predict (positions 1..T-1).

    Returns hidden [B, T-1, H] and labels [B, T-1].
    """
    hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"), batch.get("document_ids"))
    return hidden[:, :-1], batch["labels"][:, 1:]


def fused_head_weight(model: Transformer) -> torch.Tensor | None:
    """The [V, H] weight the fused LM-head kernels multiply by: the head's weight, or W + s B A for a
    LoRA-adapted head (lora.effective_weight). None when the head cannot be fused exactly: a bias, or
    adapter dropout active in training; the callers then go through plain logits."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        return None
    if isinstance(head, LoRALinear) and head.training and head.dropout_p > 0 and not (head.merged or head.disabled):
        return None
    return effective_weight(head)


def causal_lm_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over trained labels (sft and pt)."""
    hidden, labels = _shifted(model, batch)
    weight = fused_head_weight(model)
    if weight is not None:
        H = hidden.shape[-1]
        total = kernels.linear_cross_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum", backend=model.kernel_backend)
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)  # a batch with nothing to learn gives 0
    return lm_loss(model.lm_head(hidden), labels, ignore_index=IGNORE_INDEX)


def head_logprobs(model: Transformer, hidden: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[label] at each position, 0 where label == -100.

    hidden: [B, N, H], labels: [B, N] (the token each position predicts)  ->  [B, N] float32.
    """
    B, N, H = hidden.shape
    weight = fused_head_weight(model)
    if weight is not None:
        flat = kernels.linear_logprobs(hidden.reshape(-1, H), weight, labels.reshape(-1),
                                       temperature=temperature, backend=model.kernel_backend)
        return flat.view(B, N)
    return token_logps(model.lm_head(hidden), labels, ignore_index=IGNORE_INDEX, temperature=temperature)


@torch.no_grad()
def head_entropy(model: Transformer, hidden: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                 chunk: int | None = None) -> torch.Tensor:
    """Entropy of softmax(lm_head(hidden) / temperature) where `mask` is True, 0 elsewhere (a diagnostic:
    no gradient). The LM head runs on the masked positions only, `chunk` of them at a time (default
    kernels' cpu_chunk_size: 128 MB of fp32 logits), so the [B, N, V] logits never exist at once.

    hidden: [B, N, H], mask: [B, N] bool  ->  [B, N] float32.
    """
    rows = hidden[mask]  # [M, H]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if rows.shape[0] == 0:
        return out
    step = chunk or cpu_chunk_size(rows.shape[0], model.config.vocab_size)
    values = torch.cat([entropy_from_logits(model.lm_head(rows[i: i + step]).float() / temperature)
                        for i in range(0, rows.shape[0], step)])  # [M]
    out[mask] = values
    return out


def label_logprobs(model: Transformer, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(label_t | tokens < t) for every trained label, 0 elsewhere.

    batch: input_ids, attention_mask, labels [B, T]  ->  [B, T-1] (aligned with labels[:, 1:]).
    """
    hidden, labels = _shifted(model, batch)
    return head_logprobs(model, hidden, labels, temperature)


def sequence_logprobs(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's trained labels, and how many there are: losses.sequence_logps of the
    model's logits over the labelled positions, through the fused LM head (`label_logprobs`).

    batch: input_ids, attention_mask, labels [B, T] (labels aligned with input_ids, IGNORE_INDEX where
    untrained)  ->  (sums [B] float32, counts [B] long).
    """
    token = label_logprobs(model, batch)  # [B, T-1]
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # [B]
    return token.float().sum(-1), counts


def pair_logprobs(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of both sides of a preference batch (chosen_/rejected_ input_ids, attention_mask,
    labels [B, T]) as one [2B, T] forward: (sums [2B], counts [2B]), rows 0..B-1 the chosen answers and
    B..2B-1 the rejected ones."""
    keys = ("input_ids", "attention_mask", "labels")
    both = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}  # [2B, T] each
    return sequence_logprobs(model, both)
