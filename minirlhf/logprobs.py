"""From a decoder and a batch to what the losses consume: next-token cross-entropy and per-token
log-probs of the labels.

Both go through the fused LM-head kernels (minirlhf/kernels) when the head is a plain nn.Linear, so
the [B, T, V] logits are never materialised; a head wrapped by LoRA goes through plain logits.
Labels are aligned with input_ids (labels[t] is the token at t, -100 where not trained); the shift
to "position t predicts token t+1" happens here and only here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minirlhf import kernels
from minirlhf.losses import lm_loss, token_logps
from minirlhf.model import Transformer

IGNORE = -100


def _shifted(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of positions 0..T-2 and the labels they predict (positions 1..T-1).

    Returns hidden [B, T-1, H] and labels [B, T-1].
    """
    hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"), batch.get("document_ids"))
    return hidden[:, :-1], batch["labels"][:, 1:]


def _plain_head(model: Transformer) -> bool:
    return type(model.lm_head) is nn.Linear and model.lm_head.bias is None


def causal_lm_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over trained labels (sft and pt)."""
    hidden, labels = _shifted(model, batch)
    if _plain_head(model):
        H = hidden.shape[-1]
        total = kernels.linear_cross_entropy(hidden.reshape(-1, H), model.lm_head.weight, labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum", backend=model.kernel_backend)
        return total / (labels != IGNORE).sum().clamp(min=1)  # a batch with nothing to learn gives 0
    return lm_loss(model.lm_head(hidden), labels, ignore_index=IGNORE)


def label_logprobs(model: Transformer, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(label_t | tokens < t) for every trained label, 0 elsewhere.

    batch: input_ids, attention_mask, labels [B, T]  ->  [B, T-1] (aligned with labels[:, 1:]).
    """
    hidden, labels = _shifted(model, batch)
    B, T1, H = hidden.shape
    if _plain_head(model):
        flat = kernels.linear_logprobs(hidden.reshape(-1, H), model.lm_head.weight, labels.reshape(-1),
                                       temperature=temperature, backend=model.kernel_backend)
        return flat.view(B, T1)
    return token_logps(model.lm_head(hidden), labels, ignore_index=IGNORE, temperature=temperature)
