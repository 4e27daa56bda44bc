"""Data files -> rows -> encoded examples, every bad row named `file:line:`.

Rows come from .jsonl (one JSON value a line), .json (one array of them) or .txt (one document per
blank-line-separated paragraph), each with the line it starts on. `load_examples` applies an encoder
(data.py's, by data format) to every row, in this process or in forked workers; a row the encoder refuses
(`RowError`, or a chat template's TokenizerError) becomes a DataError naming its file and line, or is
skipped and counted with [data] skip_bad_rows.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minirlhf.bpe import TokenizerError
from minirlhf.errors import UserError


class RowError(Exception):
    """What is wrong with one row (raised by an encoder); load_examples adds the file and line."""


class DataError(UserError, ValueError):
    """A malformed input row or file; the message starts with `file:line:`."""



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
            raise RuntimeError(f"minirlhf/data_files.py: tokenizer worker {k} failed: {value}")
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
    """(True, the example) or (False, what is wrong with the row): a malformed row, or a row the chat
    template refuses (its raise_exception, a conversation it cannot render)."""
    try:
        return True, encode(row)
    except (RowError, TokenizerError) as e:
        return False, str(e)
