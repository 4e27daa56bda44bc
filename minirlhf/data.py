"""Datasets: rows (data_files.py) rendered through the chat template into examples, the prompt masked and the
whole truncated, then packed and collated (batching.py).

Inputs are .jsonl (one object a line), .json (an array of objects) or, for pt, .txt (one document per
blank-line-separated paragraph). Formats:

    text        {"text": ...}                                        pt: packed into block_size blocks
    alpaca      {"instruction", "input"?, "output", "system"?}       sft
    sharegpt    {"conversations": [{"from", "value"}...]} or {"messages": [{"role", "content"}...]}
    preference  {"prompt" | "query", "chosen", "rejected"}; chosen/rejected may be message lists
    kto         {"prompt", "completion", "label": true | false}
    prompt      {"prompt"} or a message list, rendered with add_generation_prompt=True (ppo)

Every example is tokenized once, up front, into plain lists of ints. `labels` has the length of
`input_ids` and holds -100 wherever no loss is taken; the training step shifts it (position t predicts
labels[t + 1]). Which tokens are trained comes from the tokenizer's `assistant_mask`, never from
`ids != pad_id`: with pad == eos that comparison would drop the end-of-turn token every answer must
learn to emit.

Truncation (cutoff_len) keeps the answer: the prompt (everything before the final answer, after a
leading BOS, which is always kept) loses its oldest tokens first. Only when the answer alone leaves less
than half the budget to the prompt does the answer lose tokens from its end, and the prompt keeps
min(prompt, budget // 2) tokens.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from minirlhf.batching import (
    collate_kto,
    collate_preference,
    collate_prompts,
    collate_sft,
    pack_documents,
    pack_examples,
)
from minirlhf.config import Config, DataSection
from minirlhf.data_files import DataError, RowError, load_examples, read_all
from minirlhf.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- row fields

def _get_str(row: dict, key: str, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}' (row has: {', '.join(row) or 'nothing'})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def _messages(turns: Any, key: str) -> list[dict[str, str]]:
    """ShareGPT ({from, value}; human/gpt/system) or OpenAI ({role, content}) turns as {role, content}."""
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{key}' must be a non-empty list of turns, got {type(turns).__name__}")
    out = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"{key} turn {n} must be an object, got {type(turn).__name__}")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        if role_key not in turn or text_key not in turn:
            raise RowError(f"{key} turn {n} needs '{role_key}' and '{text_key}' (has: {', '.join(turn)})")
        role = turn[role_key]
        if role not in _ROLES:
            raise RowError(f"{key} turn {n} has unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = turn[text_key]
        if not isinstance(content, str):
            raise RowError(f"{key} turn {n} '{text_key}' must be a string, got {type(content).__name__}")
        if _ROLES[role] == "system" and n > 1:
            raise RowError(f"{key} turn {n}: a system turn may only come first")
        if _ROLES[role] == "assistant" and not content.strip():
            raise RowError(f"{key} turn {n}: empty answer")
        out.append({"role": _ROLES[role], "content": content})
    return out


def _with_system(messages: list[dict[str, str]], row: dict, data: DataSection) -> list[dict[str, str]]:
    system = _get_str(row, data.system_field, required=False)
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def _prompt_messages(row: dict, data: DataSection) -> list[dict[str, str]]:
    """The prompt of a preference/kto/prompt row: a string (as one user turn) or a list of turns."""
    key = data.prompt_field if data.prompt_field in row else "query" if "query" in row else None
    if key is None:
        raise RowError(f"missing field '{data.prompt_field}' (row has: {', '.join(row) or 'nothing'})")
    value = row[key]
    if isinstance(value, list):
        return _messages(value, key)
    return [{"role": "user", "content": _get_str(row, key, nonempty=True)}]


def _answer_messages(row: dict, key: str) -> list[dict[str, str]]:
    """An answer: a string (one assistant turn) or a list of turns ending with the assistant's."""
    if key not in row:
        raise RowError(f"missing field '{key}' (row has: {', '.join(row)})")
    value = row[key]
    if isinstance(value, list):
        turns = _messages(value, key)
    else:
        turns = [{"role": "assistant", "content": _get_str(row, key, nonempty=True)}]
    if turns[-1]["role"] != "assistant":
        raise RowError(f"field '{key}' must end with an assistant turn")
    return turns


# ----------------------------------------------------------------------------- tokens and masks

def _render(tok: Any, messages: list[dict[str, str]], end_at_answer: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and assistant mask of a conversation. end_at_answer drops what the template writes after
    the final answer's end-of-turn token (chatml's trailing newline), so that a scored sequence ends where
    a generated answer stops: the reward model is read at that token, in rm training and in ppo alike."""
    enc = tok.apply_chat_template(messages)
    ids, mask = list(enc.ids), [bool(m) for m in enc.assistant_mask]
    if len(ids) != len(mask):
        raise RowError(f"chat template gave {len(ids)} ids but {len(mask)} assistant-mask entries")
    if not any(mask):
        raise RowError("the chat template marked no assistant tokens (does it support assistant masks?)")
    if end_at_answer:
        end = max(i for i, m in enumerate(mask) if m) + 1
        ids, mask = ids[:end], mask[:end]
    return ids, mask


def _last_answer_start(mask: Sequence[bool]) -> int:
    """Index where the last run of assistant (True) tokens starts."""
    end = max(i for i, m in enumerate(mask) if m)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def _keep_prompt(prompt_len: int, answer_len: int, budget: int) -> int:
    """How many prompt tokens survive truncation to `budget` (see the module docstring)."""
    if prompt_len + answer_len <= budget:
        return prompt_len
    return min(prompt_len, max(budget - answer_len, min(prompt_len, budget // 2)))


def _truncate(ids: list[int], labels: list[int], split: int, keep_prompt: int, budget: int,
              head: int) -> tuple[list[int], list[int]]:
    """Keep ids[:head] (BOS), the last `keep_prompt` tokens of ids[head:split], and the answer ids[split:]
    cut to `budget - keep_prompt` tokens."""
    keep_answer = budget - keep_prompt
    prompt = slice(split - keep_prompt, split)
    answer = slice(split, split + keep_answer)
    return (ids[:head] + ids[prompt] + ids[answer], labels[:head] + labels[prompt] + labels[answer])


def _head(ids: list[int], tok: Any) -> int:
    return 1 if ids and tok.bos_id is not None and ids[0] == tok.bos_id else 0


def _masked_example(tok: Any, messages: list[dict[str, str]], cutoff_len: int,
                    final_only: bool) -> tuple[list[int], list[int], int]:
    """Render, label the assistant tokens (all turns, or the final answer only), truncate.

    Returns (input_ids, labels, prompt_len) where prompt_len is where the final answer starts.
    """
    ids, mask = _render(tok, messages)
    split = _last_answer_start(mask)
    labels = [t if m and (i >= split or not final_only) else IGNORE_INDEX
              for i, (t, m) in enumerate(zip(ids, mask))]
    head = _head(ids, tok)
    budget = cutoff_len - head
    keep = _keep_prompt(split - head, len(ids) - split, budget)
    ids, labels = _truncate(ids, labels, split, keep, budget, head)
    return ids, labels, head + keep


# ----------------------------------------------------------------------------- one row -> one example

def encode_text(row: Any, tok: Any, data: DataSection, add_bos: bool = False) -> list[int]:
    """pt: one document's tokens, [BOS] + text + EOS."""
    text = row if isinstance(row, str) else _get_str(_as_object(row), data.text_field, nonempty=True)
    if not text.strip():
        raise RowError("empty text")
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    return bos + list(tok.encode(text)) + [tok.eos_id]


def encode_sft(row: Any, tok: Any, data: DataSection) -> dict[str, list[int]]:
    """sft: {input_ids, labels}, loss on every assistant turn (with its end-of-turn token)."""
    row = _as_object(row)
    fmt = data.format
    turns_key = data.messages_field or ("conversations" if "conversations" in row else "messages")
    if fmt == "auto":
        if data.messages_field or "conversations" in row or "messages" in row:
            fmt = "sharegpt"
        elif data.instruction_field in row:
            fmt = "alpaca"
        else:
            raise RowError(f"row has neither '{data.instruction_field}' (alpaca) nor "
                            f"'conversations'/'messages' (sharegpt); has: {', '.join(row) or 'nothing'}")
    if fmt == "alpaca":
        instruction = _get_str(row, data.instruction_field)
        extra = _get_str(row, data.input_field, required=False)
        prompt = "\n\n".join(p for p in (instruction, extra) if p)
        if not prompt.strip():
            raise RowError(f"empty prompt: '{data.instruction_field}' and '{data.input_field}' are both empty")
        answer = _get_str(row, data.output_field)
        if not answer.strip():
            raise RowError(f"empty answer in field '{data.output_field}'")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        if turns_key not in row:
            raise RowError(f"missing field '{turns_key}' (row has: {', '.join(row) or 'nothing'})")
        messages = _messages(row[turns_key], turns_key)
        if messages[-1]["role"] != "assistant":
            raise RowError(f"'{turns_key}' must end with an assistant turn, got {messages[-1]['role']}")
    ids, labels, _ = _masked_example(tok, _with_system(messages, row, data), data.cutoff_len, final_only=False)
    return {"input_ids": ids, "labels": labels}


def encode_preference(row: Any, tok: Any, data: DataSection, margin_field: str = "") -> dict[str, Any]:
    """rm/dpo: {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, prompt_len[, margin]}.

    Labels cover the final answer only. Both sides keep the same number of prompt tokens under truncation.
    """
    row = _as_object(row)
    has_prompt = data.prompt_field in row or "query" in row
    if not has_prompt and not isinstance(row.get(data.chosen_field), list):
        raise RowError(f"missing field '{data.prompt_field}' (needed unless '{data.chosen_field}' and "
                        f"'{data.rejected_field}' are lists of turns; row has: {', '.join(row) or 'nothing'})")
    prompt = _prompt_messages(row, data) if has_prompt else []
    chosen = prompt + _answer_messages(row, data.chosen_field)
    rejected = prompt + _answer_messages(row, data.rejected_field)
    if chosen[:-1] != rejected[:-1]:
        raise RowError(f"'{data.chosen_field}' and '{data.rejected_field}' must share every turn but the last")
    sides = []
    for messages in (chosen, rejected):
        ids, mask = _render(tok, _with_system(messages, row, data), end_at_answer=True)
        split = _last_answer_start(mask)
        labels = [t if m and i >= split else IGNORE_INDEX for i, (t, m) in enumerate(zip(ids, mask))]
        sides.append((ids, labels, split))
    head = _head(sides[0][0], tok)
    budget = data.cutoff_len - head
    longest_answer = max(len(ids) - split for ids, _, split in sides)
    keep = _keep_prompt(sides[0][2] - head, longest_answer, budget)
    out: dict[str, Any] = {"prompt_len": head + keep}
    for name, (ids, labels, split) in zip(("chosen", "rejected"), sides):
        out[f"{name}_input_ids"], out[f"{name}_labels"] = _truncate(ids, labels, split, keep, budget, head)
    if margin_field:
        if margin_field not in row:
            raise RowError(f"missing field '{margin_field}' ([rm] margin_field)")
        margin = row[margin_field]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise RowError(f"field '{margin_field}' must be a number, got {type(margin).__name__}")
        out["margin"] = float(margin)
    return out


def encode_kto(row: Any, tok: Any, data: DataSection) -> dict[str, Any]:
    """kto: {input_ids, labels, prompt_len, desirable}; labels cover the completion only."""
    row = _as_object(row)
    label = row.get(data.label_field)
    if data.label_field not in row:
        raise RowError(f"missing field '{data.label_field}' (row has: {', '.join(row)})")
    if not isinstance(label, bool):
        raise RowError(f"field '{data.label_field}' must be true or false, got {json.dumps(label)}")
    messages = _prompt_messages(row, data) + _answer_messages(row, data.completion_field)
    ids, labels, prompt_len = _masked_example(tok, _with_system(messages, row, data), data.cutoff_len,
                                              final_only=True)
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len, "desirable": label}


def encode_prompt(row: Any, tok: Any, data: DataSection, max_len: int | None = None) -> dict[str, Any]:
    """ppo, grpo: {input_ids, prompt, fields}: input_ids of the prompt rendered with add_generation_prompt=True;
    `prompt` the prompt as the row gives it (its text, or its turns when there are several); `fields` the
    row's other columns as they are (e.g. {"answer": "122"}), which grpo's reward functions receive.

    Accepts a prompt (string or turns), a message list (a final assistant turn, the reference answer, is
    dropped), or an alpaca row. Longer prompts lose their oldest tokens (BOS kept) down to max_len.
    """
    row = _as_object(row)
    turns_key = data.messages_field or ("conversations" if "conversations" in row else "messages")
    if data.prompt_field in row or "query" in row:
        messages = _prompt_messages(row, data)
        used = (data.prompt_field if data.prompt_field in row else "query",)
    elif turns_key in row:
        messages = _messages(row[turns_key], turns_key)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        used = (turns_key,)
    elif data.instruction_field in row:
        instruction = _get_str(row, data.instruction_field)
        extra = _get_str(row, data.input_field, required=False)
        messages = [{"role": "user", "content": "\n\n".join(p for p in (instruction, extra) if p)}]
        used = (data.instruction_field, data.input_field)
    else:
        raise RowError(f"row has no prompt: expected '{data.prompt_field}', 'messages' or "
                        f"'{data.instruction_field}'; has: {', '.join(row) or 'nothing'}")
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise RowError("the prompt must end with a non-empty user turn")
    ids = list(tok.apply_chat_template(_with_system(messages, row, data), add_generation_prompt=True).ids)
    max_len = max_len or data.cutoff_len
    head = _head(ids, tok)
    if len(ids) > max_len:
        ids = ids[:head] + ids[len(ids) - (max_len - head):]
    prompt = messages[0]["content"] if len(messages) == 1 else messages
    return {"input_ids": ids, "prompt": prompt, "fields": {k: v for k, v in row.items() if k not in used}}


def _as_object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    return row


# ----------------------------------------------------------------------------- a run's datasets

def load_text_blocks(files: Sequence[str], tok: Any, data: DataSection, add_bos: bool = False) -> list[dict]:
    """Text documents of `files` (a text-format file each), packed into [data] block_size blocks as pt
    trains on them (ppo's pretraining mix)."""
    encode = functools.partial(encode_text, tok=tok, data=data, add_bos=add_bos)
    docs, _ = load_examples(files, encode, data.skip_bad_rows, data.num_workers)
    return pack_documents(docs, data.block_size)


def split_rows(rows: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, eval) split: a seeded permutation picks round(fraction * n) eval rows;
    both parts keep the file order."""
    n_eval = round(fraction * len(rows))
    if fraction > 0 and len(rows) > 1:
        n_eval = min(max(n_eval, 1), len(rows) - 1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def drop_identical_pairs(examples: list[dict]) -> tuple[list[dict], int]:
    """Preference examples without those whose chosen and rejected tokens are identical (after truncation):
    such a pair states no preference, and its loss is a constant with zero gradient (log 2 for dpo's
    sigmoid loss and the reward model's), so it only dilutes the batch. Returns (kept, how many dropped)."""
    kept = [e for e in examples if e["chosen_input_ids"] != e["rejected_input_ids"]]
    return kept, len(examples) - len(kept)


def _check_eval_data(data: DataSection, eval_rows: int, eval_examples: int, train_rows: int,
                     eval_every: int) -> None:
    """Eval that was asked for ([data] eval_split > 0 or eval_files) must give examples: a DataError
    otherwise; eval_every without any eval data gets one warning line."""
    if eval_examples:
        return
    if data.eval_files:
        raise DataError(f"{', '.join(data.eval_files)}: no usable evaluation examples in [data] eval_files "
                        f"({eval_rows} rows read)")
    if data.eval_split > 0:
        held = (f"holds out no row of the {train_rows} training row(s)" if eval_rows == 0 else
                f"holds out {eval_rows} row(s), none of them usable")
        raise DataError(f"[data] eval_split = {data.eval_split:g} {held}; raise it, give eval_files, or set "
                        f"eval_split = 0 to train without evaluation")
    if eval_every:
        logger.warning("[train] eval_every = %d, but there is no eval data ([data] eval_split = 0 and no "
                       "eval_files): nothing will be evaluated", eval_every)


@dataclass(frozen=True)
class DataFormat:
    """How the rows of one [data] format become examples, and examples a batch."""

    encode: Callable[..., Any]  # encode(row, tok, data, **options) -> one example
    collate: Callable[..., dict[str, torch.Tensor]]  # collate(examples, pad_id) -> a batch of tensors


# every [data] format; a stage names those it reads (its StageSpec), "auto" meaning the first
FORMATS = {
    "text": DataFormat(encode_text, collate_sft),
    "alpaca": DataFormat(encode_sft, collate_sft),
    "sharegpt": DataFormat(encode_sft, collate_sft),
    "preference": DataFormat(encode_preference, collate_preference),
    "kto": DataFormat(encode_kto, collate_kto),
    "prompt": DataFormat(encode_prompt, collate_prompts),
}


@dataclass
class Datasets:
    """Tokenized train and eval examples of a stage, the bad rows skipped, and the format's collator."""

    train: list[dict]
    eval: list[dict]
    skipped: list[str] = field(default_factory=list)
    collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]] | None = None


def build_datasets(cfg: Config, tok: Any, formats: Sequence[str], pack: bool = False, **options: Any) -> Datasets:
    """Read, split and encode the [data] files in their format: [data] format, or for "auto" formats[0], the
    first of those the stage reads (sft's "alpaca" encoder tells alpaca from sharegpt row by row).

    Text documents are packed into block_size blocks (pt), other examples too when `pack` ([sft] packing);
    preference pairs whose two sides are identical are dropped. options go to the format's encoder
    (add_bos for text, margin_field for preference).
    """
    data = cfg.data
    fmt = formats[0] if data.format == "auto" else data.format
    encode: Callable[[Any], Any] = functools.partial(FORMATS[fmt].encode, tok=tok, data=data, **options)
    rows, skipped = read_all(data.train_files, data.skip_bad_rows)
    if data.eval_files:
        eval_rows, eval_skipped = read_all(data.eval_files, data.skip_bad_rows)
        skipped += eval_skipped
    else:
        rows, eval_rows = split_rows(rows, data.eval_split, data.seed)
    parts, ties = [], []
    for part in (rows, eval_rows):
        examples, bad = load_examples((), encode, data.skip_bad_rows, data.num_workers, rows=part)
        skipped += bad
        if fmt == "text":
            examples = pack_documents(examples, data.block_size)
        elif pack:
            examples = pack_examples(examples, data.block_size)
        if fmt == "preference":
            examples, tied = drop_identical_pairs(examples)
            ties.append(tied)
        parts.append(examples)
    if skipped:
        logger.warning("skipped %d malformed rows; first: %s", len(skipped), skipped[0])
    if sum(ties):
        logger.warning("skipped %d preference rows (train %d, eval %d) whose chosen and rejected answers are "
                       "identical after tokenization and truncation to [data] cutoff_len = %d: they state no "
                       "preference and give no gradient", sum(ties), ties[0], ties[1], data.cutoff_len)
    if not parts[0]:
        raise DataError(f"{', '.join(data.train_files)}: no training examples")
    _check_eval_data(data, len(eval_rows), len(parts[1]), len(rows), cfg.train.eval_every)
    return Datasets(parts[0], parts[1], skipped, functools.partial(FORMATS[fmt].collate, pad_id=tok.pad_id))
