"""Batched generation with a preallocated KV cache (gpt-fast style), as PPO's rollout needs it.

Prompts come left padded, so every row's last prompt token sits in the last column and all rows
step together: one forward over the prompts fills the cache ("prefill"), then one token per step.
Rows that produced a stop token keep stepping (the batch stays rectangular) but emit pad tokens,
marked invalid in the returned mask.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirlhf.inference_weights import inference_weights, worth_fusing
from minirlhf.model import Transformer, positions_from_mask, rope_is_dynamic


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


NUCLEUS_CANDIDATES = 1024  # top-p looks at the best this many tokens first (see _top_candidates)


def _nucleus(sorted_logits: torch.Tensor, log_total: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the best-first logits [B, m] stay in the top-p nucleus (Holtzman et al. 2020, section 3.1):
    those whose better-ranked tokens hold less than top_p of the probability (log_total [B, 1]: the
    log-sum-exp over all candidates). The most likely token always stays. Returns [B, m] bool."""
    probs = (sorted_logits - log_total).exp()
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    return mass_before < top_p


def _top_candidates(logits: torch.Tensor, top_k: int | None, top_p: float | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens that survive top-k and the top-p nucleus, best first: (logits [B, m] with -inf for
    the dropped ones, their token ids [B, m]); None when nothing is filtered.

    The most likely token always survives; a token tied with the k-th is kept. Sorting all V logits
    each step was what sampling cost most (80 ms a step for 32 rows of a 49k vocabulary on one CPU
    core), so the nucleus is looked for among the top-k, or without top-k among the best
    NUCLEUS_CANDIDATES tokens when they hold top_p of the probability in every row (exact: every token
    outside them ranks after them); only otherwise are all V sorted.

    Both decisions read a number back from the device (the count of ties with the k-th value; whether a
    row's nucleus fills all candidates), so on a GPU top-k / top-p sampling syncs once a token; greedy and
    plain temperature sampling do not.
    """
    V = logits.shape[-1]
    k = top_k if top_k is not None and 0 < top_k < V else None
    nucleus = top_p is not None and top_p < 1.0
    if k is None and not nucleus:
        return None
    best, order = torch.topk(logits, k if k is not None else min(V, NUCLEUS_CANDIDATES), dim=-1)  # (B, m)
    if k is not None:
        kth = best[:, -1:]
        kept = int((logits >= kth).sum(-1).max())
        if kept > k:  # ties with the k-th value (common in bf16) are kept too: widen to all of them
            best, order = torch.topk(logits, kept, dim=-1)
            best = best.masked_fill(best < kth, float("-inf"))
        if not nucleus:
            return best, order
        keep = _nucleus(best, best.logsumexp(-1, keepdim=True), top_p)
    else:
        keep = _nucleus(best, logits.logsumexp(-1, keepdim=True), top_p)
        if best.shape[-1] < V and bool((keep.sum(-1) == best.shape[-1]).any()):  # the nucleus may go on
            best, order = torch.sort(logits, dim=-1, descending=True)
            keep = _nucleus(best, logits.logsumexp(-1, keepdim=True), top_p)
    return best.masked_fill(~keep, float("-inf")), order


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf the logits outside the top-k and outside the top-p nucleus (Holtzman et al. 2020).

    logits: [B, V] -> [B, V]. The most likely token always survives; a token tied with the k-th is kept.
    """
    found = _top_candidates(logits, top_k, top_p)
    if found is None:
        return logits
    best, order = found
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, best > float("-inf"))
    return logits.masked_fill(~kept, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [B, m] (rows summing to 1), by inverting the cumulative distribution
    at a uniform draw: index i when cdf[i-1] <= u < cdf[i], so zero-probability entries are never drawn.
    torch.multinomial draws one exponential variable per entry instead (25 ms for 32 x 49k on a CPU
    core); this draws one number per row. The cumulative sum is float64 so that the last of 49k
    entries still gets its probability. Returns [B] long."""
    cdf = probs.double().cumsum(-1)  # (B, m)
    if cdf.device.type == "cpu" and not bool(torch.isfinite(cdf[:, -1]).all()):  # (no sync on a GPU)
        # the message torch.multinomial gives, which callers (ppo) recognise
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


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
        tokens = logits.max(-1).indices  # the first maximum, as argmax, in a third of argmax's CPU time
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    candidates = _top_candidates(scaled, top_k, top_p)
    if candidates is None:
        tokens = draw(scaled.softmax(-1), generator)
    else:  # draw among the survivors only
        best, order = candidates
        tokens = order.gather(-1, draw(best.softmax(-1), generator)[:, None])[:, 0]
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]


def cache_mask(key_is_real: torch.Tensor, start: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask for t queries written at cache slots start..start+t: [B, S] bool (True = a real
    token; pads and unwritten slots False) -> [B, 1, t, S], 0 where a query may attend, -inf elsewhere.

    Query i sees slot j iff j <= i and both are real or both are pads (a pad query then still has a
    key, so no attention row is empty; pads never reach a real token's result).
    """
    S = key_is_real.shape[1]
    slots = torch.arange(S, device=key_is_real.device)
    causal = slots[None, :] <= slots[start: start + t, None]  # (t, S)
    same_kind = key_is_real[:, start: start + t, None] == key_is_real[:, None, :]  # (B, t, S)
    mask = torch.zeros(key_is_real.shape[0], 1, t, S, dtype=dtype, device=key_is_real.device)
    return mask.masked_fill_(~(causal & same_kind)[:, None], float("-inf"))


def prefill_mask(prompt_mask: torch.Tensor, cache_len: int, dtype: torch.dtype) -> torch.Tensor:
    """`cache_mask` of the prompt pass: [B, P] bool (True = real token) -> [B, 1, P, cache_len]."""
    return cache_mask(F.pad(prompt_mask, (0, cache_len - prompt_mask.shape[1])), 0, prompt_mask.shape[1], dtype)


def step_mask(prompt_mask: torch.Tensor, cache_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask of a one-token step before any new token is written: [B, P] -> [B, 1, 1, cache_len],
    0 on real prompt slots, -inf on pads and unwritten slots. The loop opens one slot a step in place,
    so the mask is never rebuilt, and hands each step the view of the slots written so far."""
    key_is_real = F.pad(prompt_mask, (0, cache_len - prompt_mask.shape[1]))  # (B, S)
    mask = torch.zeros(key_is_real.shape, dtype=dtype, device=prompt_mask.device)
    return mask.masked_fill_(~key_is_real, float("-inf"))[:, None, None, :]


def compiled_step(model: Transformer):
    """model.decode_step under torch.compile: inductor on CPU, CUDA graphs (mode="reduce-overhead") on
    GPU. Inductor fuses the elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU, the residual adds,
    the casts); the matmuls themselves stay the prepacked oneDNN ones on a CPU (`prepacked_linear`).

    The attended length (the mask's last dimension: the slots written so far) grows by one every step, so
    it is marked dynamic and compiled symbolically from the first call. The first call compiles (tens of
    seconds on a CPU: benchmarks/generate.py --ours compile reports it) and later calls of the same batch
    size and cache length reuse it. The first call with another cache length compiles once more with that
    length symbolic too (torch.compile's automatic dynamic shapes), and so does the first one with another
    batch size; a batch of one is always compiled apart. A run whose lengths and batch sizes vary so
    compiles up to four graphs, then reuses them."""
    mode = "reduce-overhead" if model.embed_tokens.weight.is_cuda else None
    step = torch.compile(model.decode_step, mode=mode)

    def run(input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
            ) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(mask, 3)  # else the first two steps would compile a graph each
        # the KV cache is module buffers, whose sizes dynamo otherwise keeps static: every cache length
        # would compile anew instead of once symbolically
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return step(input_ids, positions, slots, mask)

    return run


def prefill(model: Transformer, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """Run left-padded prompts input_ids [B, P] (prompt_mask [B, P], True = real) into the model's KV cache;
    return the hidden state of each row's last token [B, C].

    The pads are left out of every token-wise product (the projections, the MLP: most of the work; a
    fifth of the tokens of a rollout batch of chat prompts): the real tokens run packed in one row and
    meet the padded layout only inside the attention (`Attention.attend_cache`). Not with a dynamic
    RoPE scaling, whose frequencies depend on each row's length.
    """
    B, P = input_ids.shape
    positions = positions_from_mask(prompt_mask)
    mask = prefill_mask(prompt_mask, P, model.embed_tokens.weight.dtype)  # (B, 1, P, P)
    if bool(prompt_mask.all()) or rope_is_dynamic(model.config):
        return model.decode_step(input_ids, positions, torch.arange(P, device=input_ids.device), mask)[:, -1]
    rows, cols = prompt_mask.nonzero().T  # (N,) each: row by row, each row's tokens in order
    hidden = model.decode_step(input_ids[rows, cols][None], positions[rows, cols][None], torch.stack([rows, cols]),
                               mask)  # (1, N, C)
    return hidden[0, prompt_mask.sum(-1).cumsum(0) - 1]  # left padded: a row's last token is its last real one


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
    fused_weights: bool | None = None,
    compile: bool = False,
) -> GenerationOutput:
    """Continue left-padded prompts input_ids [B, P] (attention_mask [B, P], 1 = real) by up to
    max_new_tokens tokens each, stopping each row at its first stop token (eos_token_id, defaulting to
    the model config's eos; a list means any of them).

    fused_weights: decode with fused, LoRA-folded and (on CPU) prepacked copies of the weights
    (minirlhf/inference_weights.py: faster, one more copy of the weights while this runs); None = where
    that pays (`worth_fusing`; never while FSDP holds the weights sharded). compile: run each step
    through `compiled_step`.
    """
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
    if fused_weights is None:
        fused_weights = worth_fusing(model, B)

    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    valid = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    S = P + max_new_tokens
    dtype = model.embed_tokens.weight.dtype

    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, S)
    try:
        prepack = not torch.is_autocast_enabled(device.type)
        # the prefill runs on the modules' own weights: its [B * P, H] products gain nothing from weights
        # packed for B rows (measured slower: 2.7 against 2.1 s for 32 x 46 tokens of SmolLM2, fp32)
        last = prefill(model, input_ids, prompt_mask)  # (B, C)
        with inference_weights(model, B, prepack) if fused_weights else nullcontext() as frozen_head:
            head = frozen_head or model.lm_head
            step = compiled_step(model) if compile else model.decode_step
            logits = head(last)  # (B, V): the LM head on the last position only
            mask = step_mask(prompt_mask, S, dtype)  # (B, 1, 1, S); step i attends the first P + i + 1 slots
            slot = torch.full((1,), P, dtype=torch.long, device=device)
            next_pos = prompt_mask.sum(-1, keepdim=True)  # (B, 1)
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            steps = 0
            for i in range(max_new_tokens):
                tok, logp = sample_next(logits, temperature, top_k, top_p, generator)
                alive = ~finished
                tokens[:, i] = torch.where(alive, tok, pad)
                logprobs[:, i] = torch.where(alive, logp, 0.0)
                valid[:, i] = alive
                finished = finished | (alive & torch.isin(tok, stop_ids))
                steps = i + 1
                # checking for "all done" syncs with the device, so do it every few steps only
                if i == max_new_tokens - 1 or (i % 4 == 3 and bool(finished.all())):
                    break
                mask.index_fill_(-1, slot, 0.0)  # the new token's slot becomes visible
                hidden = step(tokens[:, i: i + 1], next_pos, slot, mask[..., : P + i + 1])
                logits = head(hidden[:, -1])
                next_pos += 1
                slot += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)

    tokens, logprobs, valid = tokens[:, :steps], logprobs[:, :steps], valid[:, :steps]
    return GenerationOutput(torch.cat([input_ids, tokens], 1), tokens, logprobs, valid)
