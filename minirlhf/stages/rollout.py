"""PPO's experience: sample answers to a batch of prompts and measure them with every model involved.

    prompts [P columns, left padded] --policy.generate (KV cache, no grad)--> answers [N columns]
    sequence = prompt + answer                                          input_ids [B, P + N]
    logprobs     log pi(a_t | s_t) recomputed by a training-style forward    [B, N]
    ref_logprobs the same under the reference (adapter off, or a frozen copy)  [B, N]
    values       V(s_t) from the critic, read at the token before a_t     [B, N]
    scores       the reward model (or any ScoreFn) on the whole sequence  [B]

Rows are prompt-major: with k samples per prompt, rows i*k .. i*k + k - 1 share prompt i, as the
group estimators of losses.py (GRPO, RLOO) expect. Answers are right padded: `response_mask[b, t]` is
True for generated tokens up to and including the stop token, so the sequence is left- and
right-padded and `attention_mask` marks its real tokens.

Position t of the answer is predicted by the hidden state at column P - 1 + t, so every per-token
quantity here is read from columns P - 1 .. P + N - 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from minirlhf.distributed import reshard
from minirlhf.heads import RewardModel
from minirlhf.logprobs import head_logprobs
from minirlhf.losses import IGNORE_INDEX, entropy_from_logits, mask_truncated_completions
from minirlhf.model import Transformer



@dataclass
class Rollout:
    """One batch of experience. Every tensor has B rows; per-token tensors have the N answer columns.

    input_ids:      [B, P + N]  prompt (left padded) + answer (right padded with pad tokens)
    attention_mask: [B, P + N]  1 on real tokens
    response_mask:  [B, N]      True on generated tokens up to and including the stop token
    prompt_len:     P, the number of prompt columns
    logprobs:       [B, N]      policy log-probs of the answer tokens (0 where masked)
    ref_logprobs:   [B, N]      reference log-probs
    values:         [B, N]      critic values V(s_t), or None without a critic
    scores:         [B]         the score used as the final reward (after normalisation, penalty, clip)
    raw_scores:     [B]         the scorer's output as it came
    has_stop:       [B]         True when the answer ended with a stop token
    entropy:        [B, N]      entropy of the policy's next-token distribution (a diagnostic)
    rewards, advantages, returns: [B, N], filled by the advantage step (returns is None without a critic)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    raw_scores: torch.Tensor | None = None
    has_stop: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        """The answer tokens [B, N]."""
        return self.input_ids[:, self.prompt_len:]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rows `rows` (a 1-D index tensor), with the answer columns trimmed to the longest answer
        among them: right padding after every selected answer changes nothing under causal attention."""
        width = int(self.response_mask[rows].sum(-1).max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                value = value[rows.to(value.device)]
                if value.dim() == 2:  # per-token tensors end at column P + width or at width
                    value = value[:, : self.prompt_len + width] if f.name in ("input_ids", "attention_mask") \
                        else value[:, :width]
            out[f.name] = value
        return Rollout(**out)


# A scorer maps a rollout (its sequences, masks and answer tokens) to one score per row, [B] float32.
# The reward model is one (`RewardModelScorer`); a Python function of the decoded text is another
# (`text_scorer`).
ScoreFn = Callable[[Rollout], torch.Tensor]


def micro_batches(n: int, size: int) -> Iterator[torch.Tensor]:
    """Row indices 0..n-1 in consecutive chunks of `size`."""
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


@torch.no_grad()
def generate_rollout(
    policy: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: list[int] | int | None = None,
    pad_id: int | None = None,
) -> tuple[Rollout, torch.Tensor]:
    """Sample `samples_per_prompt` answers to each left-padded prompt of input_ids [Bp, P].

    Returns (a Rollout with input_ids, attention_mask, response_mask, prompt_len and has_stop set;
    the generation's own log-probs [B, N] of the answer tokens, B = Bp * samples_per_prompt).
    Sampling draws from the global torch RNG, which the trainer checkpoints, so a resumed run samples
    the same answers.
    """
    ids = input_ids.repeat_interleave(samples_per_prompt, dim=0)  # (B, P), prompt-major
    mask = attention_mask.repeat_interleave(samples_per_prompt, dim=0)
    out = policy.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k or None, top_p=top_p, eos_token_id=stop_ids, pad_token_id=pad_id)
    response_mask = out.mask  # (B, N)
    _, truncated = mask_truncated_completions(out.tokens, response_mask, stop_ids if stop_ids is not None else [])
    rollout = Rollout(input_ids=out.sequences, attention_mask=torch.cat([mask.long(), response_mask.long()], 1),
                      response_mask=response_mask, prompt_len=ids.shape[1], has_stop=~truncated)
    return rollout, out.logprobs


def response_logprobs(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(a_t | s_t) of each answer token under softmax(logits / temperature), and optionally the
    entropy of that distribution (no gradient).

    input_ids, attention_mask: [B, P + N]; response_mask: [B, N]. Returns ([B, N] float32, 0 where the mask
    is False; [B, N] or None). The LM head is applied to the N answer positions only and through the
    fused kernel (minirlhf/kernels), so the [B, N, V] logits exist only for the entropy diagnostic.
    The temperature is the sampling one: the ratio pi / pi_old is taken between the distributions the
    answers were drawn from (top-k / top-p truncation is not modelled).
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, prompt_len - 1: -1]  # (B, N, H)
    labels = input_ids[:, prompt_len:].masked_fill(~response_mask.bool(), IGNORE_INDEX)  # (B, N)
    logps = head_logprobs(model, hidden, labels, temperature)  # (B, N)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(model.lm_head(hidden).float() / temperature)  # (B, N)
            entropy = entropy.masked_fill(~response_mask.bool(), 0.0)
    return logps, entropy


def response_values(critic: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(s_t) for each answer token: the critic read at the column before it. [B, P + N] -> [B, N] float32,
    0 where response_mask is False."""
    values = critic.values(input_ids, attention_mask)[:, prompt_len - 1: -1]  # (B, N)
    return values.masked_fill(~response_mask.bool(), 0.0)


class RewardModelScorer:
    """A ScoreFn reading the (frozen) reward model at each sequence's last real token: the stop token, or
    the last generated token of an answer cut at max_new_tokens. `reward_model` is public so that the ppo
    stage can hand it to distributed.prepare_stage for sharding; a sharded one gives its gathered weights
    back after each rollout (distributed.reshard)."""

    def __init__(self, reward_model: RewardModel, micro_batch_size: int):
        self.reward_model, self.micro_batch_size = reward_model, micro_batch_size

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        out = []
        for rows in micro_batches(rollout.size, self.micro_batch_size):
            rows = rows.to(rollout.input_ids.device)
            out.append(self.reward_model(rollout.input_ids[rows], rollout.attention_mask[rows]).float())
        reshard(self.reward_model)
        return torch.cat(out)


def text_scorer(tokenizer, fn: Callable[[list[str], list[str]], list[float]]) -> ScoreFn:
    """A ScoreFn from a Python function of text: fn(prompts, answers) -> one float per row. Prompts are
    decoded without their padding, answers without special tokens."""

    def score(rollout: Rollout) -> torch.Tensor:
        prompts, answers = decode_rollout(tokenizer, rollout)
        values = fn(prompts, answers)
        if len(values) != rollout.size:
            raise ValueError(f"rollout.text_scorer: the reward function returned {len(values)} scores for "
                             f"{rollout.size} answers")
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=rollout.input_ids.device)

    return score


def decode_rollout(tokenizer, rollout: Rollout) -> tuple[list[str], list[str]]:
    """(prompts with their special tokens, answers without them) as text, one per row."""
    P = rollout.prompt_len
    prompt_mask = rollout.attention_mask[:, :P].bool().cpu()
    ids = rollout.input_ids.cpu()
    prompts = [tokenizer.decode(ids[b, :P][prompt_mask[b]].tolist()) for b in range(rollout.size)]
    answers = [tokenizer.decode(ids[b, P:][rollout.response_mask[b].cpu()].tolist(), skip_special_tokens=True)
               for b in range(rollout.size)]
    return prompts, answers
