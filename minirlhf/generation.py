"""Batched generation with a preallocated KV cache (gpt-fast style), as PPO's rollout needs it.

Prompts come left padded, so every row's last prompt token sits in the last column and all rows
step together: one forward over the prompts fills the cache ("prefill"), then one token per step.
Rows that produced a stop token keep stepping (the batch stays rectangular) but emit pad tokens,
marked invalid in the returned mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirlhf.model import Transformer, positions_from_mask


@dataclass
class GenerationOutput:
    """What a rollout consumes.

    sequences: [B, P + N]  the prompts as given (left padded) followed by the new tokens
    tokens:    [B, N]      new tokens; pad_token_id after a row stopped
    logprobs:  [B, N]      log-prob of each new token under softmax(logits / temperature)
                           (raw logits when greedy), before top-k / top-p filtering; 0 where invalid
    mask:      [B, N]      True for generated tokens up to and including the stop token
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the top-p nucleus (Holtzman et al. 2020).

    logits: [B, V] -> [B, V]. The most likely token always survives.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        remove_sorted = mass_before >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; greedy when temperature == 0.

    logits: [B, V] -> (tokens [B], logprobs [B]) with log-probs as described in GenerationOutput.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Continue left-padded prompts input_ids [B, P] (attention_mask [B, P], 1 = real) by up to
    max_new_tokens tokens each, stopping each row at its first stop token (eos_token_id, defaulting to
    the model config's eos; a list means any of them)."""
    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompt_mask = attention_mask.bool()
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("generate expects left-padded prompts: every row's last column must be a real token")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    stop_ids = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=device)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (int(stop_ids[0]) if len(stop_ids) else 0)

    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    valid = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    key_is_real = torch.cat([prompt_mask, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)

    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, P + max_new_tokens)
    try:
        hidden = model.decode_step(input_ids, positions_from_mask(prompt_mask), 0, key_is_real)
        logits = model.lm_head(hidden[:, -1])  # (B, V)
        next_pos = prompt_mask.sum(-1)  # (B,)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        steps = 0
        for step in range(max_new_tokens):
            tok, logp = sample_next(logits, temperature, top_k, top_p, generator)
            alive = ~finished
            tokens[:, step] = torch.where(alive, tok, pad)
            logprobs[:, step] = torch.where(alive, logp, 0.0)
            valid[:, step] = alive
            finished = finished | (alive & torch.isin(tok, stop_ids))
            steps = step + 1
            # checking for "all done" syncs with the device, so do it every few steps only
            if step == max_new_tokens - 1 or (step % 4 == 3 and bool(finished.all())):
                break
            hidden = model.decode_step(tokens[:, step : step + 1], next_pos[:, None], P + step, key_is_real)
            logits = model.lm_head(hidden[:, -1])
            next_pos = next_pos + 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)

    tokens, logprobs, valid = tokens[:, :steps], logprobs[:, :steps], valid[:, :steps]
    return GenerationOutput(torch.cat([input_ids, tokens], 1), tokens, logprobs, valid)
