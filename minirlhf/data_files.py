"""Data files -> rows: .jsonl (one JSON value a line), .json (one array of them) or .txt (one document per
blank-line-separated paragraph), each row with the line it starts on, so that every error about a row or a
file can say `file:line:` (data.py turns rows into examples).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from minirlhf.errors import UserError


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
