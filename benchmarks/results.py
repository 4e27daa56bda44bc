"""What every script in benchmarks/ shares: the RESULTS.md table and the strings that fill its columns.

A script is run as `python benchmarks/X.py`, which puts this folder on sys.path, so it imports these
with `from results import ...`. Standard library only: load_memory.py measures a process's memory
from the moment torch is imported, and importing this must not move that baseline.

    append_rows([[today(), what, shape, time, throughput, ratio, memory, device, versions("torch")]])

Run as a script it prints what `make bench` shows at the end: `--mark` prints how many lines RESULTS.md
has, `--since N` the rows appended after line N as a table of ratios.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository; scripts put it on sys.path for minirlhf
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Rows are appended by the scripts in benchmarks/ (never rewritten). `ratio` compares with the baseline
named in `what`, measured in the same run on the same machine; >1 means ours is better.

| date | what | shape | time | throughput | ratio | memory | device | versions |
|---|---|---|---|---|---|---|---|---|
"""
COLUMNS = 9  # the header's columns, in its order
# the real checkpoint the speed benchmarks run on; `make bench` builds it with ../shared/real-models/smollm2.sh
REAL_MODEL = Path("/tmp/real/smollm2")


def append_rows(rows: list[list[str]], path: Path = RESULTS) -> None:
    """Append table rows to RESULTS.md (existing rows are never rewritten), creating it with its
    header first if it is missing. Each row is the nine cells of HEADER's columns, in order."""
    for row in rows:
        if len(row) != COLUMNS:
            raise ValueError(f"benchmarks/results.py append_rows: a row needs {COLUMNS} cells "
                             f"(date ... versions), got {len(row)}: {row!r}")
    if not path.exists():
        path.write_text(HEADER)
    with path.open("a") as f:
        for row in rows:
            f.write("| " + " | ".join(row) + " |\n")


def today() -> str:
    """The `date` column: today as YYYY-MM-DD."""
    return datetime.date.today().isoformat()


def cpu_name() -> str:
    """The processor's name for the `device` column ('x86_64' where the platform gives no more)."""
    return platform.processor() or platform.machine()


def cpu_device(threads: int) -> str:
    """The `device` column of a CPU run: the processor and the torch threads it computed on."""
    return f"CPU {cpu_name()}, {threads} thread(s)"


def versions(*names: str) -> str:
    """The `versions` column, in the order given: versions("python", "torch") -> "python 3.11.7,
    torch 2.13.0". "python" is the interpreter; any other name is imported and its __version__ read."""
    parts = []
    for name in names:
        version = platform.python_version() if name == "python" else importlib.import_module(name).__version__
        parts.append(f"{name} {version}")
    return ", ".join(parts)


def require_model(path: Path) -> None:
    """Exit with a one-line hint when the benchmark's model directory is missing."""
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"{path}: no model directory here; build it with `bash ../shared/real-models/smollm2.sh "
                         f"{path}` (what `make bench` does), or pass --model DIR")


def run_json(cmd: list[str]) -> dict:
    """Run a benchmark's worker process and return the JSON object of its last stdout line that starts with
    "{"; a failed worker stops the benchmark with the command and the tail of its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def ratio_table(rows: list[list[str]]) -> str:
    """what | shape | ratio | memory of RESULTS.md rows, aligned for a terminal."""
    cells = [[r[1], r[2], r[5], r[6]] for r in rows]
    header = ["what", "shape", "ratio", "memory"]
    widths = [min(100, max(len(c[i]) for c in cells + [header])) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c[i][:widths[i]].ljust(widths[i]) for i in range(4)) for c in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="RESULTS.md helpers for `make bench`")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--mark", action="store_true", help="print the number of lines of RESULTS.md")
    group.add_argument("--since", type=int, metavar="N", help="print the rows after line N as a table")
    args = parser.parse_args()
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    if args.mark:
        print(len(lines))
        return
    rows = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in lines[args.since:] if ln.startswith("| ")]
    print(ratio_table(rows) if rows else "no rows appended")


if __name__ == "__main__":
    main()
