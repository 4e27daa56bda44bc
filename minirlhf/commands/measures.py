"""What `minirlhf eval` measures on a set of answers, one function each: reward-model scores, sequence
log-probs (for the KL), reward-function scores, win scores, per-prompt means, and the perplexity of a file.

Answers are keyed by (prompt_index, sample_index); every function returns one number per key.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from minirlhf.commands.generate import Answer, Prompt
from minirlhf.commands.report import Metric, bootstrap_interval

if TYPE_CHECKING:
    from minirlhf.heads import RewardModel
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

Key = tuple[int, int]  # (prompt_index, sample_index)
RewardFunction = Callable[..., list]  # or minirlhf.rewards.RewardFunction

# --------------------------------------------------------------------------------------------------
# scores of answers


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i: i + size] for i in range(0, len(items), size))


def _per_answer(answers: dict[Key, Answer], batch_size: int,
                measure: Callable[[Sequence[Key]], "list[float]"]) -> dict[Key, float]:
    """measure(keys) -> one number per key, over the answers in batches of batch_size, without gradient."""
    import torch

    out = {}
    with torch.no_grad():
        for chunk in _batches(list(answers), batch_size):
            out.update(zip(chunk, measure(chunk)))
    return out


def reward_model_scores(rm: "RewardModel", prompts: dict[int, Prompt], answers: dict[Key, Answer], pad_id: int,
                        batch_size: int) -> dict[Key, float]:
    """The reward model's score of each prompt + answer (+ stop token), read at the last token."""
    from minirlhf.data import collate_prompts

    device = rm.head.weight.device

    def measure(keys: Sequence[Key]) -> list[float]:
        batch = collate_prompts([{"input_ids": prompts[i].ids + answers[(i, s)].ids} for i, s in keys], pad_id)
        return rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu().tolist()

    return _per_answer(answers, batch_size, measure)


def sequence_logprobs(model: "Transformer", prompts: dict[int, Prompt], answers: dict[Key, Answer], pad_id: int,
                      batch_size: int) -> dict[Key, float]:
    """log p(answer | prompt) = sum_t log p(y_t | x, y_<t) over the answer's tokens (stop token included)."""
    from minirlhf.data import IGNORE_INDEX, collate_sft
    from minirlhf.logprobs import label_logprobs

    device = model.embed_tokens.weight.device

    def measure(keys: Sequence[Key]) -> list[float]:
        examples = [{"input_ids": prompts[i].ids + answers[(i, s)].ids,
                     "labels": [IGNORE_INDEX] * len(prompts[i].ids) + answers[(i, s)].ids} for i, s in keys]
        batch = {k: v.to(device) for k, v in collate_sft(examples, pad_id).items()}
        return label_logprobs(model, batch).sum(-1).float().cpu().tolist()

    return _per_answer(answers, batch_size, measure)


def prompt_value(row: dict):
    """What a reward function receives as the prompt: the row's prompt (a string or turns) or messages."""
    for key in ("prompt", "query", "messages", "conversations", "instruction"):
        if key in row:
            return row[key]
    return None


def load_reward_functions(specs: Sequence[str]) -> list[RewardFunction]:
    """'module:fn' / 'file.py:fn' specs (a file path taken from the current directory), loaded as the grpo
    stage loads them (minirlhf.rewards)."""
    from minirlhf.rewards import load_reward_function

    return [load_reward_function(spec) for spec in specs]


def function_name(fn: RewardFunction) -> str:
    """The metric name of a reward function: its spec's function part ('minirlhf.rewards:number_match' ->
    'number_match'), or a plain callable's name."""
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)).rpartition(":")[2]


def reward_function_scores(functions: Sequence[RewardFunction], prompts: dict[int, Prompt],
                           answers: dict[Key, Answer]) -> list[dict[Key, float | None]]:
    """Each function over every answer at once (rewards.score_completions: the grpo stage's call, with the
    prompt rows' columns and completion_lengths as fields). One {key: reward or None} per function."""
    from minirlhf.rewards import score_completions

    keys = list(answers)
    rows = [prompts[i].row for i, _ in keys]
    columns = set.intersection(*(set(r) for r in rows)) - {"prompt"} if rows else set()
    fields = {k: [r[k] for r in rows] for k in sorted(columns)}
    fields["completion_lengths"] = [answers[k].tokens + (answers[k].finish_reason == "stop") for k in keys]
    labels = [f"prompt {i} (line {prompts[i].line}), sample {s}" for i, s in keys]
    scores = score_completions(functions, [prompt_value(r) for r in rows], [answers[k].text for k in keys],
                               fields, labels)  # [N, F], NaN where a function returned None
    return [{k: None if math.isnan(v) else v for k, v in zip(keys, column)} for column in scores.T.tolist()]


def per_prompt(values: dict[Key, float | None]) -> list[float]:
    """Mean over each prompt's samples (None skipped); prompts with no value left out. [n_prompts]."""
    groups: dict[int, list[float]] = defaultdict(list)
    for (i, _), v in values.items():
        if v is not None:
            groups[i].append(v)
    return [sum(g) / len(g) for _, g in sorted(groups.items())]


def win_scores(a: dict[Key, float], b: dict[Key, float]) -> dict[Key, float]:
    """1 where A's answer scores higher, 1/2 on a tie, 0 where lower."""
    return {k: 1.0 if a[k] > b[k] else 0.5 if a[k] == b[k] else 0.0 for k in a}


# --------------------------------------------------------------------------------------------------
# perplexity


def perplexity_documents(model: "Transformer", tok: "Tokenizer", path: str | Path, batch_size: int
                         ) -> list[tuple[float, int]]:
    """(sum of NLL, predicted tokens) of each document of a text or chat file.

    Text (a .txt paragraph or a {"text"} row): [bos] + text + eos, every token after the first predicted;
    a document longer than the model's positions is cut into consecutive windows. Chat ({"messages"} /
    {"conversations"} / alpaca rows): the assistant tokens, as sft trains them (data.encode_sft).
    """
    import torch

    from minirlhf.config import DataSection
    from minirlhf.data import DataError, collate_sft, encode_sft, encode_text, load_examples, read_all
    from minirlhf.logprobs import label_logprobs

    window = model.config.max_position_embeddings
    section = DataSection(cutoff_len=window)
    rows, _ = read_all([str(path)])
    if not rows:
        raise DataError(f"{path}: no documents in the file")

    def encode(row):
        if isinstance(row, str) or (isinstance(row, dict) and section.text_field in row):
            ids = encode_text(row, tok, section, add_bos=True)
            return [{"input_ids": ids[i: i + window], "labels": ids[i: i + window]}
                    for i in range(0, max(len(ids) - 1, 1), window)]
        return [encode_sft(row, tok, section)]

    documents = load_examples([], encode, rows=rows)[0]
    pieces = [(d, piece) for d, doc in enumerate(documents) for piece in doc]
    totals = [[0.0, 0] for _ in documents]
    device = model.embed_tokens.weight.device
    with torch.no_grad():
        for chunk in _batches(pieces, batch_size):
            batch = {k: v.to(device) for k, v in collate_sft([p for _, p in chunk], tok.pad_id).items()}
            nll = -label_logprobs(model, batch).sum(-1)  # [B]
            counts = (batch["labels"][:, 1:] != -100).sum(-1)  # [B]
            for (d, _), value, n in zip(chunk, nll.tolist(), counts.tolist()):
                totals[d][0] += value
                totals[d][1] += n
    return [(s, n) for s, n in totals if n > 0]


def perplexity_metric(docs: Sequence[tuple[float, int]], resamples: int, seed: int) -> Metric:
    """exp(sum NLL / sum tokens), bootstrapped over documents (numerator and denominator together)."""
    nll, n = [s / max(c, 1) for s, c in docs], [c for _, c in docs]
    total = sum(s for s, _ in docs) / max(sum(n), 1)
    low, high = bootstrap_interval(nll, resamples, seed, weights=n, transform=lambda x: math.exp(min(x, 700)))
    return Metric("perplexity", math.exp(min(total, 700)), low, high, len(docs),
                  f"token-weighted, {sum(n)} tokens")
