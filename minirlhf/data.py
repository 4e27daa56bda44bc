"""Datasets: read rows, render them through the chat template, mask the prompt, truncate, pack, collate.

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
import itertools
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from minirlhf.config import Config, DataSection
from minirlhf.errors import UserError

IGNORE_INDEX = -100

logger = logging.getLogger(__name__)

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class DataError(UserError, ValueError):
    """A malformed input row or file; the message starts with `file:line:`."""


class _RowError(Exception):
    """What is wrong with one row; the loader adds the file and line."""


# ----------------------------------------------------------------------------- reading files

def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line, row, error) for every row of a .jsonl, .json or .txt file.

    error is None for a good row, else what is wrong (the row is then None); a bad .jsonl line is
    reported and reading goes on. A .json file must be one array; invalid JSON there stops the read
    with a DataError, since no later element can be trusted. A .txt row is a paragraph string.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise DataError(f"{path}: unknown file type '{suffix}' (expected .jsonl, .json or .txt)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if suffix == ".jsonl":
        # split on "\n" only: str.splitlines would also split at U+2028 inside a JSON string; each line is
        # decoded on its own, so a line that is not UTF-8 is one bad row (skip_bad_rows applies)
        for i, line_bytes in enumerate(raw.split(b"\n"), start=1):
            try:
                line = line_bytes.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield i, None, _not_utf8(e)[1]
                continue
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON: {e.msg} (column {e.colno})"
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, message = _not_utf8(e)
        raise DataError(f"{path}:{line}: {message}") from None
    if suffix == ".txt":
        yield from _txt_rows(text)
    else:
        yield from _json_array_rows(text, path)


def _not_utf8(e: UnicodeDecodeError) -> tuple[int, str]:
    """(line, what is wrong) for bytes that failed to decode: the first bad byte, its line (1-based, counted
    in the bytes given to the decoder) and column."""
    data = e.object  # what the decoder saw (after a byte-order mark)
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - data.rfind(b"\n", 0, e.start)
    return line, f"not UTF-8 text: byte {data[e.start]:#04x} at column {column} ({e.reason}); save the file as UTF-8"


def _txt_rows(text: str) -> Iterator[tuple[int, str, None]]:
    """Paragraphs separated by blank lines, each with the number of its first line."""
    start, buf = 0, []
    for i, line in enumerate((raw.rstrip("\r") for raw in text.split("\n")), start=1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line)
        elif buf:
            yield start, "\n".join(buf), None
            buf = []
    if buf:
        yield start, "\n".join(buf), None


def _json_array_rows(text: str, path: Path) -> Iterator[tuple[int, Any, None]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{line_at(i)}: a .json file must hold one array of objects "
                        f"(write one object a line in a .jsonl file otherwise)")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    line, last = 1, 0
    while True:
        line += text.count("\n", last, i)
        last = i
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line, obj, None
        i = skip(i)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]" and skip(i + 1) == len(text):
            return
        raise DataError(f"{path}:{line_at(i)}: invalid JSON: expected ',' or a final ']' after an element")


# ----------------------------------------------------------------------------- row fields

def _get_str(row: dict, key: str, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field '{key}' (row has: {', '.join(row) or 'nothing'})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise _RowError(f"field '{key}' is empty")
    return value


def _messages(turns: Any, key: str) -> list[dict[str, str]]:
    """ShareGPT ({from, value}; human/gpt/system) or OpenAI ({role, content}) turns as {role, content}."""
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"field '{key}' must be a non-empty list of turns, got {type(turns).__name__}")
    out = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _RowError(f"{key} turn {n} must be an object, got {type(turn).__name__}")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        if role_key not in turn or text_key not in turn:
            raise _RowError(f"{key} turn {n} needs '{role_key}' and '{text_key}' (has: {', '.join(turn)})")
        role = turn[role_key]
        if role not in _ROLES:
            raise _RowError(f"{key} turn {n} has unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = turn[text_key]
        if not isinstance(content, str):
            raise _RowError(f"{key} turn {n} '{text_key}' must be a string, got {type(content).__name__}")
        if _ROLES[role] == "system" and n > 1:
            raise _RowError(f"{key} turn {n}: a system turn may only come first")
        if _ROLES[role] == "assistant" and not content.strip():
            raise _RowError(f"{key} turn {n}: empty answer")
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
        raise _RowError(f"missing field '{data.prompt_field}' (row has: {', '.join(row) or 'nothing'})")
    value = row[key]
    if isinstance(value, list):
        return _messages(value, key)
    return [{"role": "user", "content": _get_str(row, key, nonempty=True)}]


def _answer_messages(row: dict, key: str) -> list[dict[str, str]]:
    """An answer: a string (one assistant turn) or a list of turns ending with the assistant's."""
    if key not in row:
        raise _RowError(f"missing field '{key}' (row has: {', '.join(row)})")
    value = row[key]
    if isinstance(value, list):
        turns = _messages(value, key)
    else:
        turns = [{"role": "assistant", "content": _get_str(row, key, nonempty=True)}]
    if turns[-1]["role"] != "assistant":
        raise _RowError(f"field '{key}' must end with an assistant turn")
    return turns


# ----------------------------------------------------------------------------- tokens and masks

def _render(tok: Any, messages: list[dict[str, str]], end_at_answer: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and assistant mask of a conversation. end_at_answer drops what the template writes after
    the final answer's end-of-turn token (chatml's trailing newline), so that a scored sequence ends where
    a generated answer stops: the reward model is read at that token, in rm training and in ppo alike."""
    enc = tok.apply_chat_template(messages)
    ids, mask = list(enc.ids), [bool(m) for m in enc.assistant_mask]
    if len(ids) != len(mask):
        raise _RowError(f"chat template gave {len(ids)} ids but {len(mask)} assistant-mask entries")
    if not any(mask):
        raise _RowError("the chat template marked no assistant tokens (does it support assistant masks?)")
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
        raise _RowError("empty text")
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
            raise _RowError(f"row has neither '{data.instruction_field}' (alpaca) nor "
                            f"'conversations'/'messages' (sharegpt); has: {', '.join(row) or 'nothing'}")
    if fmt == "alpaca":
        instruction = _get_str(row, data.instruction_field)
        extra = _get_str(row, data.input_field, required=False)
        prompt = "\n\n".join(p for p in (instruction, extra) if p)
        if not prompt.strip():
            raise _RowError(f"empty prompt: '{data.instruction_field}' and '{data.input_field}' are both empty")
        answer = _get_str(row, data.output_field)
        if not answer.strip():
            raise _RowError(f"empty answer in field '{data.output_field}'")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        if turns_key not in row:
            raise _RowError(f"missing field '{turns_key}' (row has: {', '.join(row) or 'nothing'})")
        messages = _messages(row[turns_key], turns_key)
        if messages[-1]["role"] != "assistant":
            raise _RowError(f"'{turns_key}' must end with an assistant turn, got {messages[-1]['role']}")
    ids, labels, _ = _masked_example(tok, _with_system(messages, row, data), data.cutoff_len, final_only=False)
    return {"input_ids": ids, "labels": labels}


def encode_preference(row: Any, tok: Any, data: DataSection, margin_field: str = "") -> dict[str, Any]:
    """rm/dpo: {chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, prompt_len[, margin]}.

    Labels cover the final answer only. Both sides keep the same number of prompt tokens under truncation.
    """
    row = _as_object(row)
    has_prompt = data.prompt_field in row or "query" in row
    if not has_prompt and not isinstance(row.get(data.chosen_field), list):
        raise _RowError(f"missing field '{data.prompt_field}' (needed unless '{data.chosen_field}' and "
                        f"'{data.rejected_field}' are lists of turns; row has: {', '.join(row) or 'nothing'})")
    prompt = _prompt_messages(row, data) if has_prompt else []
    chosen = prompt + _answer_messages(row, data.chosen_field)
    rejected = prompt + _answer_messages(row, data.rejected_field)
    if chosen[:-1] != rejected[:-1]:
        raise _RowError(f"'{data.chosen_field}' and '{data.rejected_field}' must share every turn but the last")
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
            raise _RowError(f"missing field '{margin_field}' ([rm] margin_field)")
        margin = row[margin_field]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise _RowError(f"field '{margin_field}' must be a number, got {type(margin).__name__}")
        out["margin"] = float(margin)
    return out


def encode_kto(row: Any, tok: Any, data: DataSection) -> dict[str, Any]:
    """kto: {input_ids, labels, prompt_len, desirable}; labels cover the completion only."""
    row = _as_object(row)
    label = row.get(data.label_field)
    if data.label_field not in row:
        raise _RowError(f"missing field '{data.label_field}' (row has: {', '.join(row)})")
    if not isinstance(label, bool):
        raise _RowError(f"field '{data.label_field}' must be true or false, got {json.dumps(label)}")
    messages = _prompt_messages(row, data) + _answer_messages(row, data.completion_field)
    ids, labels, prompt_len = _masked_example(tok, _with_system(messages, row, data), data.cutoff_len,
                                              final_only=True)
    return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len, "desirable": label}


def encode_prompt(row: Any, tok: Any, data: DataSection, max_len: int | None = None) -> dict[str, list[int]]:
    """ppo: {input_ids} of the prompt rendered with add_generation_prompt=True.

    Accepts a prompt (string or turns), a message list (a final assistant turn, the reference answer, is
    dropped), or an alpaca row. Longer prompts lose their oldest tokens (BOS kept) down to max_len.
    """
    row = _as_object(row)
    turns_key = data.messages_field or ("conversations" if "conversations" in row else "messages")
    if data.prompt_field in row or "query" in row:
        messages = _prompt_messages(row, data)
    elif turns_key in row:
        messages = _messages(row[turns_key], turns_key)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif data.instruction_field in row:
        instruction = _get_str(row, data.instruction_field)
        extra = _get_str(row, data.input_field, required=False)
        messages = [{"role": "user", "content": "\n\n".join(p for p in (instruction, extra) if p)}]
    else:
        raise _RowError(f"row has no prompt: expected '{data.prompt_field}', 'messages' or "
                        f"'{data.instruction_field}'; has: {', '.join(row) or 'nothing'}")
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise _RowError("the prompt must end with a non-empty user turn")
    ids = list(tok.apply_chat_template(_with_system(messages, row, data), add_generation_prompt=True).ids)
    max_len = max_len or data.cutoff_len
    head = _head(ids, tok)
    if len(ids) > max_len:
        ids = ids[:head] + ids[len(ids) - (max_len - head):]
    return {"input_ids": ids}


def _as_object(row: Any) -> dict:
    if not isinstance(row, dict):
        raise _RowError(f"row must be a JSON object, got {type(row).__name__}")
    return row


# ----------------------------------------------------------------------------- packing

def pack_documents(docs: Sequence[Sequence[int]], block_size: int) -> list[dict[str, list[int]]]:
    """pt: concatenate documents (each ending in EOS) and cut into blocks of `block_size` tokens.

    A document cut at a block boundary continues in the next block as a new segment. Each block carries
    document_ids [T] (0, 1, ... per segment), position_ids [T] restarting at 0 per segment, and labels
    with -100 on each segment's first token, so no token is predicted from another document's tokens.
    A final partial block is kept when it has at least 2 tokens.
    """
    blocks: list[dict[str, list[int]]] = []
    cur = _empty_block()
    for doc in docs:
        offset = 0
        while offset < len(doc):
            piece = list(doc[offset: offset + block_size - len(cur["input_ids"])])
            _append_segment(cur, piece, piece)
            offset += len(piece)
            if len(cur["input_ids"]) == block_size:
                blocks.append(cur)
                cur = _empty_block()
    if len(cur["input_ids"]) >= 2:
        blocks.append(cur)
    return blocks


def pack_examples(examples: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """sft packing: put whole examples, in order, into blocks of at most `block_size` tokens.

    A block is closed when the next example does not fit; examples longer than block_size are cut to
    block_size. Same document_ids / position_ids / first-label rules as `pack_documents`.
    """
    blocks: list[dict[str, list[int]]] = []
    cur = _empty_block()
    for ex in examples:
        ids, labels = ex["input_ids"][:block_size], ex["labels"][:block_size]
        if len(cur["input_ids"]) + len(ids) > block_size:
            blocks.append(cur)
            cur = _empty_block()
        _append_segment(cur, ids, labels)
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def _empty_block() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "document_ids": [], "position_ids": []}


def _append_segment(block: dict[str, list[int]], ids: Sequence[int], labels: Sequence[int]) -> None:
    doc = block["document_ids"][-1] + 1 if block["document_ids"] else 0
    block["input_ids"] += ids
    block["labels"] += [IGNORE_INDEX] + list(labels[1:])
    block["document_ids"] += [doc] * len(ids)
    block["position_ids"] += list(range(len(ids)))


# ----------------------------------------------------------------------------- collators

def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """[B, T_max] long tensor, padded with `value` on the right (or left)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            out[i, cols] = torch.tensor(r, dtype=torch.long)
    return out


def _mask(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)


def collate_sft(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """pt/sft batch, right-padded: input_ids, attention_mask, labels [B, T] (and document_ids,
    position_ids [B, T] for packed examples; padding is its own document at position 0)."""
    ids = [e["input_ids"] for e in examples]
    batch = {"input_ids": _pad(ids, pad_id), "attention_mask": _mask(ids),
             "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX)}
    if "document_ids" in examples[0]:
        width = batch["input_ids"].shape[1]
        batch["document_ids"] = torch.tensor(
            [e["document_ids"] + [e["document_ids"][-1] + 1] * (width - len(e["document_ids"])) for e in examples])
        batch["position_ids"] = _pad([e["position_ids"] for e in examples], 0)
    return batch


def collate_preference(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """rm/dpo batch: chosen_{input_ids, attention_mask, labels} and rejected_{...}, all [B, T] with one
    common T (so the two halves can run as one [2B, T] forward), prompt_lens [B] and margin [B] if any."""
    sides = {s: [e[f"{s}_input_ids"] for e in examples] for s in ("chosen", "rejected")}
    width = max(len(r) for rows in sides.values() for r in rows)
    batch = {}
    for s, rows in sides.items():
        labels = [e[f"{s}_labels"] for e in examples]
        batch[f"{s}_input_ids"] = _pad_to(_pad(rows, pad_id), width, pad_id)
        batch[f"{s}_attention_mask"] = _pad_to(_mask(rows), width, 0)
        batch[f"{s}_labels"] = _pad_to(_pad(labels, IGNORE_INDEX), width, IGNORE_INDEX)
    batch["prompt_lens"] = torch.tensor([e["prompt_len"] for e in examples])
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def collate_kto(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """kto batch: input_ids, attention_mask, labels [B, T], desirable [B] bool, prompt_lens [B], and the
    mismatched pairs for the KL reference point (Ethayarajh et al. 2024, sec. 4.1): kl_input_ids,
    kl_attention_mask, kl_labels [B, T'] pairing prompt i with the completion of example (i + 1) % B."""
    batch = collate_sft(examples, pad_id)
    batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
    batch["prompt_lens"] = torch.tensor([e["prompt_len"] for e in examples])
    kl_ids, kl_labels = [], []
    for i, e in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        p, q = e["prompt_len"], other["prompt_len"]
        kl_ids.append(e["input_ids"][:p] + other["input_ids"][q:])
        kl_labels.append([IGNORE_INDEX] * p + other["labels"][q:])
    batch["kl_input_ids"] = _pad(kl_ids, pad_id)
    batch["kl_attention_mask"] = _mask(kl_ids)
    batch["kl_labels"] = _pad(kl_labels, IGNORE_INDEX)
    return batch


def collate_prompts(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """ppo prompt batch, LEFT-padded for generation: input_ids, attention_mask [B, T]."""
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": _pad(ids, pad_id, left=True), "attention_mask": _mask(ids, left=True)}


def collator(stage: str, pad_id: int) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """The collate function of a stage, with the pad id bound."""
    fn = {"pt": collate_sft, "sft": collate_sft, "rm": collate_preference, "dpo": collate_preference,
          "kto": collate_kto, "ppo": collate_prompts}[stage]
    return functools.partial(fn, pad_id=pad_id)


# ----------------------------------------------------------------------------- loading

def load_examples(files: Sequence[str], encode: Callable[[Any], Any], skip_bad_rows: bool = False,
                  num_workers: int = 0, rows: Sequence[tuple[str, int, Any]] | None = None,
                  ) -> tuple[list[Any], list[str]]:
    """Encode every row of `files` (or the given (file, line, row) triples) with `encode`.

    Returns (examples, skipped) where skipped lists 'file:line: what is wrong' for each bad row; without
    skip_bad_rows the first bad row raises a DataError with that message.
    """
    if rows is None:
        rows, skipped = read_all(files, skip_bad_rows)
    else:
        skipped = []
    if num_workers > 0 and len(rows) > 1 and "fork" in multiprocessing.get_all_start_methods():
        results = _encode_in_workers(encode, [r for _, _, r in rows], num_workers)
    else:
        results = [_try_encode(encode, r) for _, _, r in rows]
    examples = []
    for (path, line, _), (ok, value) in zip(rows, results):
        if ok:
            examples.append(value)
            continue
        message = f"{path}:{line}: {value}"
        if not skip_bad_rows:
            raise DataError(message)
        skipped.append(message)
    return examples, skipped


def read_all(files: Sequence[str], skip_bad_rows: bool = False) -> tuple[list[tuple[str, int, Any]], list[str]]:
    """(file, line, row) for every readable row of `files`, and the 'file:line: ...' of unreadable ones."""
    rows, skipped = [], []
    for path in files:
        for line, row, error in read_rows(path):
            if error is None:
                rows.append((str(path), line, row))
            elif skip_bad_rows:
                skipped.append(f"{path}:{line}: {error}")
            else:
                raise DataError(f"{path}:{line}: {error}")
    return rows, skipped


def _encode_in_workers(encode: Callable[[Any], Any], rows: list[Any], num_workers: int) -> list[tuple[bool, Any]]:
    """`_try_encode` over contiguous chunks of `rows` in forked processes.

    Forked children inherit `encode` (and the tokenizer inside it) from this process's memory, so it is
    never pickled (compiled chat templates cannot be); only the encoded lists come back through pipes.
    """
    ctx = multiprocessing.get_context("fork")
    bounds = [len(rows) * k // num_workers for k in range(num_workers + 1)]
    workers = []
    for lo, hi in itertools.pairwise(bounds):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_encode_chunk, args=(encode, rows[lo:hi], send), daemon=True)
        proc.start()
        send.close()
        workers.append((proc, receive))
    results = []
    for k, (proc, receive) in enumerate(workers):
        try:
            ok, value = receive.recv()
        except EOFError:
            ok, value = False, "the process died"
        proc.join()
        if not ok:
            raise RuntimeError(f"minirlhf/data.py: tokenizer worker {k} failed: {value}")
        results += value
    return results


def _encode_chunk(encode: Callable[[Any], Any], rows: list[Any], send: Any) -> None:
    try:
        send.send((True, [_try_encode(encode, r) for r in rows]))
    except Exception as e:  # noqa: BLE001 - any failure is reported to the parent, which raises it
        send.send((False, f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def _try_encode(encode: Callable[[Any], Any], row: Any) -> tuple[bool, Any]:
    try:
        return True, encode(row)
    except _RowError as e:
        return False, str(e)


def split_rows(rows: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, eval) split: a seeded permutation picks round(fraction * n) eval rows;
    both parts keep the file order."""
    n_eval = round(fraction * len(rows))
    if fraction > 0 and len(rows) > 1:
        n_eval = min(max(n_eval, 1), len(rows) - 1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


@dataclass
class Datasets:
    """Tokenized train and eval examples of a stage, the bad rows skipped, and the stage's collator."""

    train: list[dict]
    eval: list[dict]
    skipped: list[str] = field(default_factory=list)
    collate: Callable[[Sequence[dict]], dict[str, torch.Tensor]] | None = None


def build_datasets(cfg: Config, tok: Any) -> Datasets:
    """Read, split, encode (and for pt / sft packing, pack) the data of `cfg.stage`."""
    data, stage = cfg.data, cfg.stage
    encode: Callable[[Any], Any] = {
        "pt": functools.partial(encode_text, tok=tok, data=data, add_bos=cfg.pt.add_bos),
        "sft": functools.partial(encode_sft, tok=tok, data=data),
        "rm": functools.partial(encode_preference, tok=tok, data=data, margin_field=cfg.rm.margin_field),
        "dpo": functools.partial(encode_preference, tok=tok, data=data),
        "kto": functools.partial(encode_kto, tok=tok, data=data),
        "ppo": functools.partial(encode_prompt, tok=tok, data=data),
    }[stage]
    rows, skipped = read_all(data.train_files, data.skip_bad_rows)
    if data.eval_files:
        eval_rows, eval_skipped = read_all(data.eval_files, data.skip_bad_rows)
        skipped += eval_skipped
    else:
        rows, eval_rows = split_rows(rows, data.eval_split, data.seed)
    parts = []
    for part in (rows, eval_rows):
        examples, bad = load_examples((), encode, data.skip_bad_rows, data.num_workers, rows=part)
        skipped += bad
        if stage == "pt":
            examples = pack_documents(examples, data.block_size)
        elif stage == "sft" and cfg.sft.packing:
            examples = pack_examples(examples, data.block_size)
        parts.append(examples)
    if skipped:
        logger.warning("skipped %d malformed rows; first: %s", len(skipped), skipped[0])
    if not parts[0]:
        raise DataError(f"{', '.join(data.train_files)}: no training examples")
    return Datasets(parts[0], parts[1], skipped, collator(stage, tok.pad_id))


# ----------------------------------------------------------------------------- resumable iteration

class ResumableSampler:
    """Batches of example indices, reshuffled every epoch, resumable from (epoch, position).

    The order of epoch e is torch.randperm(n) under seed + e, so the state is two integers: the epoch
    and how many examples of it were already handed out. Iteration never ends; `epoch` tells the
    caller when a pass is over.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"ResumableSampler needs num_examples >= 1 and batch_size >= 1, got "
                             f"{num_examples} and {batch_size}")
        if drop_last and num_examples < batch_size:
            raise ValueError(f"ResumableSampler: drop_last with {num_examples} examples < batch_size "
                             f"{batch_size} gives no batches")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        return torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> ResumableSampler:
        return self

    def __next__(self) -> list[int]:
        left = self.num_examples - self.position
        if left == 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.position: self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != self.num_examples or state["seed"] != self.seed:
            raise ValueError(f"ResumableSampler state is for {state['num_examples']} examples with seed "
                             f"{state['seed']}, this dataset has {self.num_examples} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)


class BatchIterator:
    """Collated batches of `examples` in the order of a ResumableSampler; checkpoint its state_dict."""

    def __init__(self, examples: Sequence[dict], batch_size: int, collate: Callable[[Sequence[dict]], Any],
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        self.examples, self.collate = examples, collate
        self.sampler = ResumableSampler(len(examples), batch_size, seed, shuffle, drop_last)
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rank's share: of each world_size consecutive batches of the single-process order,
        the rank-th. Every rank advances the sampler alike, so its state stays the global position."""
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchIterator.shard: rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank reads per pass over the data."""
        return math.ceil(self.sampler.batches_per_epoch / self.world_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        batches = [next(self.sampler) for _ in range(self.world_size)]
        return self.collate([self.examples[i] for i in batches[self.rank]])

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
