"""The output file of `minirlhf generate`: one JSON row per answer, resumable, never overwritten.

    OUT.jsonl              the input row's fields + answer, tokens, finish_reason, prompt_index, sample_index
    OUT.jsonl.meta.json    {"command": "minirlhf generate", "arguments": {...}}: what wrote OUT

prompt_index is the row's position among the prompts file's rows (0-based, blank lines not counted) and
sample_index its sample (0 .. samples-1); together they identify a row, so a rerun with the same
arguments skips what is already there. An OUT without that sidecar, or one written with other arguments,
is refused: it is not a previous run of the same command. Rows are appended as batches finish (longest
prompts first); when every answer is in, the file is rewritten in (prompt_index, sample_index) order
through a temporary file and a rename, so an interruption never loses a row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from minirlhf.commands import CommandError

COMMAND = "minirlhf generate"
KEY_FIELDS = ("prompt_index", "sample_index")


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(out: Path) -> dict | None:
    """The arguments that wrote `out`, or None without a sidecar."""
    file = meta_path(out)
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CommandError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(meta, dict) or meta.get("command") != COMMAND or not isinstance(meta.get("arguments"), dict):
        raise CommandError(f"{file} is not the sidecar of a `{COMMAND}` output")
    return meta["arguments"]


def read_rows(out: Path, repair: bool = False) -> list[dict]:
    """Every row of an answer file. A last line cut short by a kill is dropped (and, with repair, cut off
    the file); any other line that is not an answer row is an error naming it."""
    data = out.read_bytes()
    rows, start = [], 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        end = start + len(line)
        is_last = end >= len(data)
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if is_last:  # an interrupted append: the row is missing, not corrupt
                    if repair:
                        with open(out, "r+b") as f:
                            f.truncate(start)
                    break
                raise CommandError(f"{out}:{number}: not a JSON row; this file was not written by `{COMMAND}`") \
                    from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), int) for k in KEY_FIELDS):
                raise CommandError(f"{out}:{number}: a row without {' and '.join(KEY_FIELDS)}; this file was not "
                                   f"written by `{COMMAND}`")
            rows.append(row)
        start = end + 1
    return rows


def read_answer_file(path: str | Path) -> tuple[dict, list[dict]]:
    """(the arguments that wrote it, its rows) for an output of `minirlhf generate`."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{path}: answer file not found")
    arguments = read_meta(path)
    if arguments is None:
        raise CommandError(f"{path} has no {meta_path(path).name}: it is not an output of `{COMMAND}`")
    return arguments, read_rows(path)


class AnswerWriter:
    """Appends answer rows to OUT; `done` holds the (prompt_index, sample_index) already there."""

    def __init__(self, out: Path, done: set[tuple[int, int]]):
        self.out, self.done = out, done
        self._file = open(out, "a", encoding="utf-8")

    @classmethod
    def open(cls, out: str | Path, arguments: dict) -> "AnswerWriter":
        """Start OUT, or resume it when it is a previous run with the same arguments; refuse anything else."""
        out = Path(out)
        if out.is_dir():
            raise CommandError(f"--out {out} is a directory; give a .jsonl file path")
        if out.exists():
            previous = read_meta(out)
            if previous is None:
                raise CommandError(f"--out {out} exists and is not a previous run of `{COMMAND}` (no "
                                   f"{meta_path(out).name} beside it); choose another --out or remove it")
            changed = sorted(k for k in set(previous) | set(arguments) if previous.get(k) != arguments.get(k))
            if changed:
                what = "; ".join(f"{k}: {previous.get(k)!r} there, {arguments.get(k)!r} now" for k in changed[:3])
                raise CommandError(f"--out {out} was written by `{COMMAND}` with other arguments ({what}); rerun "
                                   f"with the same ones to resume it, or choose another --out")
            done = {(r["prompt_index"], r["sample_index"]) for r in read_rows(out, repair=True)}
            return cls(out, done)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta_path(out).write_text(json.dumps({"command": COMMAND, "arguments": arguments}, indent=2) + "\n")
        return cls(out, set())

    def write(self, rows: Iterable[dict]) -> None:
        """Append rows and flush them to the file, so an interrupted run keeps every finished batch."""
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done.add((row["prompt_index"], row["sample_index"]))
        self._file.flush()

    def close(self, expected: int | None = None) -> None:
        """Close OUT; once it holds all `expected` rows, put them in (prompt_index, sample_index) order."""
        self._file.close()
        if expected is None or len(self.done) < expected:
            return
        rows = read_rows(self.out)
        ordered = sorted(rows, key=lambda r: (r["prompt_index"], r["sample_index"]))
        if ordered == rows:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)
