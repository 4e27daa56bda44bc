"""Experience for online RL (ppo and grpo): sample answers to a batch of prompts, measure them with
every model involved (`make_rollout`), score them and shape the scores into rewards (`ScoreShaping`).

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

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minirlhf.batching import collate_prompts
from minirlhf.distributed import DistContext, frozen_forwards, gather_cat, gathered
from minirlhf.heads import RewardModel
from minirlhf.logprobs import head_entropy, head_logprobs
from minirlhf.losses import IGNORE_INDEX, mask_truncated_completions
from minirlhf.model import Transformer

if TYPE_CHECKING:
    from minirlhf.stages.common import Reference



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


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """The rows of several rollouts as one (e.g. groups kept from several generation rounds): prompts left
    padded to the widest prompt, answers right padded to the longest answer, per-row tensors stacked. Extra
    padding changes no row's result (positions count from each row's first real token). A field must be set
    in every part or in none."""
    P = max(r.prompt_len for r in parts)
    N = max(r.response_mask.shape[1] for r in parts)
    out = {"prompt_len": P}
    for f in fields(Rollout):
        if f.name == "prompt_len":
            continue
        values = [getattr(r, f.name) for r in parts]
        if all(v is None for v in values):
            out[f.name] = None
            continue
        widened = []
        for r, v in zip(parts, values):
            if v.dim() == 2:  # sequence columns [P_r + N_r], or answer columns [N_r]
                sequence = f.name in ("input_ids", "attention_mask")
                answer_width = v.shape[1] - (r.prompt_len if sequence else 0)
                left = P - r.prompt_len if sequence else 0
                v = torch.nn.functional.pad(v, (left, N - answer_width), value=pad_id if f.name == "input_ids" else 0)
            widened.append(v)
        out[f.name] = torch.cat(widened)
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
    fused kernel (minirlhf/kernels), and the entropy a chunk of positions at a time (logprobs.head_entropy):
    the [B, N, V] logits never exist at once.
    The temperature is the sampling one: the ratio pi / pi_old is taken between the distributions the
    answers were drawn from (top-k / top-p truncation is not modelled).
    """
    hidden = model.hidden_states(input_ids, attention_mask)[:, prompt_len - 1: -1]  # (B, N, H)
    labels = input_ids[:, prompt_len:].masked_fill(~response_mask.bool(), IGNORE_INDEX)  # (B, N)
    logps = head_logprobs(model, hidden, labels, temperature)  # (B, N)
    entropy = head_entropy(model, hidden, response_mask.bool(), temperature) if with_entropy else None
    return logps, entropy


def response_values(critic: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """V(s_t) for each answer token: the critic read at the column before it. [B, P + N] -> [B, N] float32,
    0 where response_mask is False."""
    values = critic.values(input_ids, attention_mask)[:, prompt_len - 1: -1]  # (B, N)
    return values.masked_fill(~response_mask.bool(), 0.0)


@torch.no_grad()
def make_rollout(
    policy: Transformer,
    prompts: dict[str, torch.Tensor],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_ids: list[int],
    pad_id: int,
    micro_batch_size: int,
    reference: Reference | None = None,
    critic: RewardModel | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    dist: DistContext | None = None,
    measure_policy: bool = True,
) -> tuple[Rollout, float]:
    """Sample answers to a batch of prompts and measure them: generate (`generate_rollout`, the policy's
    weights gathered under torchrun), then per micro-batch of micro_batch_size sequences the policy's
    log-probs and entropy (unless measure_policy is False: an on-policy update takes them from its own
    forward), the reference's log-probs (when there is a reference) and the critic's values (when there
    is a critic), all in eval mode (log-probs without dropout: the first PPO ratio is 1) and without
    gradients.

    prompts: input_ids, attention_mask [Bp, P] left padded. Returns the Rollout (logprobs, ref_logprobs,
    entropy, values filled, or None when not measured; scores left to the caller) and the seconds spent
    generating.
    """
    start = time.perf_counter()
    with gathered(policy, dist):
        rollout, _ = generate_rollout(policy, prompts["input_ids"], prompts["attention_mask"],
                                      samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                                      pad_id=pad_id)
    generating = sync_time(rollout.input_ids) - start
    modes = [(m, m.training) for m in (policy, critic) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        P = rollout.prompt_len
        for rows in micro_batches(rollout.size, micro_batch_size):
            rows = rows.to(rollout.input_ids.device)
            ids, mask, resp = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
            with autocast():
                if measure_policy:
                    lp, ent = response_logprobs(policy, ids, mask, resp, P, temperature, with_entropy=True)
                    logprobs.append(lp.float())
                    entropy.append(ent)
                if reference is not None:
                    ref, _ = reference.run(response_logprobs, ids, mask, resp, P, temperature)
                    ref_logprobs.append(ref.float())
                if critic is not None:
                    values.append(response_values(critic, ids, mask, resp, P).float())
        rollout.logprobs = torch.cat(logprobs) if logprobs else None
        rollout.entropy = torch.cat(entropy) if entropy else None
        rollout.ref_logprobs = torch.cat(ref_logprobs) if ref_logprobs else None
        rollout.values = torch.cat(values) if values else None
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return rollout, generating


@torch.no_grad()
def greedy_rollouts(policy: Transformer, prompts: Sequence[dict], batch_size: int, max_new_tokens: int,
                    stop_ids: list[int], pad_id: int, to_device: Callable[[dict], dict] = lambda b: b,
                    dist: DistContext | None = None) -> Iterator[tuple[dict, Rollout]]:
    """Greedy answers to encoded prompts ({"input_ids"}), in rollouts of batch_size prompts, in order (for
    evaluation: greedy, so the RNG stream is untouched). Yields (the collated prompt batch, batching.
    collate_prompts's, on the device; its rollout)."""
    for start in range(0, len(prompts), batch_size):
        batch = to_device(collate_prompts(prompts[start: start + batch_size], pad_id))
        with gathered(policy, dist):
            rollout, _ = generate_rollout(policy, batch["input_ids"], batch["attention_mask"],
                                          max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                                          pad_id=pad_id)
        yield batch, rollout


class RewardModelScorer:
    """A ScoreFn reading the (frozen) reward model at each sequence's last real token: the stop token, or
    the last generated token of an answer cut at max_new_tokens. `reward_model` is public so that the ppo
    stage can declare it among its frozen models (sharded under torchrun; its forwards run inside
    distributed.frozen_forwards)."""

    def __init__(self, reward_model: RewardModel, micro_batch_size: int):
        self.reward_model, self.micro_batch_size = reward_model, micro_batch_size

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        out = []
        with frozen_forwards(self.reward_model):
            for rows in micro_batches(rollout.size, self.micro_batch_size):
                rows = rows.to(rollout.input_ids.device)
                out.append(self.reward_model(rollout.input_ids[rows], rollout.attention_mask[rows]).float())
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


def non_finite_parts(rollout: Rollout) -> list[str]:
    """Names of the rollout's measured tensors that hold a NaN or inf (one device sync)."""
    parts = {"policy log-probs": rollout.logprobs, "reference log-probs": rollout.ref_logprobs,
             "critic values": rollout.values, "scores": rollout.raw_scores}
    parts = {k: v for k, v in parts.items() if v is not None}
    if not parts:
        return []
    finite = torch.stack([torch.isfinite(v).all() for v in parts.values()]).tolist()
    return [name for name, ok in zip(parts, finite) if not ok]


def append_samples(path: Path, tokenizer, rollout: Rollout, step: int, count: int = 4) -> None:
    """Append the first `count` (prompt, answer, score, reward) rows of a scored rollout to `path` (ppo's
    OUTPUT/samples.jsonl), one JSON object a line."""
    rows = torch.arange(min(count, rollout.size))
    prompts, answers = decode_rollout(tokenizer, rollout.select(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            f.write(json.dumps({"step": step, "prompt": prompt, "response": answer,
                                "score": float(rollout.raw_scores[i]), "reward": float(rollout.scores[i])}) + "\n")


# --------------------------------------------------------------------------------------------------
# from scores to rewards


class RunningMoments:
    """Mean and (unbiased) standard deviation of every score seen so far, merged batch by batch with the
    parallel update of Chan, Golub & LeVeque 1979:

        delta = mean_b - mean,   n' = n + n_b,   mean' = mean + delta * n_b / n'
        M2' = M2 + M2_b + delta^2 * n * n_b / n',    std = sqrt(M2 / (n - 1))
    """

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class ScoreShaping:
    """A rollout's raw scores -> the rewards it trains on: normalised (norm "running": by the mean and std
    of every score so far, over all ranks, `RunningMoments`; "rm": by the reward model's training-set mean
    and std, fixed; "none"), minus `missing_eos_penalty` for answers without a stop token, clipped to
    +-reward_clip (when > 0). Its state (the running moments) goes into checkpoints."""

    def __init__(self, norm: str, reward_model: RewardModel | None = None, missing_eos_penalty: float = 0.0,
                 reward_clip: float = 0.0):
        self.norm, self.reward_model = norm, reward_model
        self.missing_eos_penalty, self.reward_clip = missing_eos_penalty, reward_clip
        self.moments = RunningMoments()

    def __call__(self, scores: torch.Tensor, has_stop: torch.Tensor) -> torch.Tensor:
        """scores, has_stop: [B] -> [B]."""
        if self.norm == "running":
            self.moments.update(gather_cat(scores))  # every rank's scores: one running mean
            scores = self.moments.normalize(scores)
        elif self.norm == "rm":
            scores = self.reward_model.normalize(scores)
        scores = scores - self.missing_eos_penalty * (~has_stop).to(scores.dtype)
        if self.reward_clip > 0:
            scores = scores.clamp(-self.reward_clip, self.reward_clip)
        return scores


def sync_time(like: torch.Tensor) -> float:
    """perf_counter after the device has finished its queued work (timings of CUDA code need this)."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()
