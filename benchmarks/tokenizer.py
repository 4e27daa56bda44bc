"""Encoding throughput: minirlhf's byte-level BPE (pure Python, per-word cache) vs Hugging Face
`tokenizers` (Rust) on the same tokenizer.json, one document at a time on one thread each.

The tokenizer is a Llama-3-style byte-level BPE trained here with `tokenizers`; the text is real
prose and code: the Python standard library's own source files, read until --kb kilobytes.
Prints both throughputs (from CPU time) and ours / theirs, checks the ids agree, and appends a row to
benchmarks/RESULTS.md.

    python benchmarks/tokenizer.py --kb 1024 --vocab 8000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tokenizers
from results import ROOT, append_rows, cpu_name, today, versions
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, str(ROOT))
from minirlhf.tokenizer import load_tokenizer

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def stdlib_documents(kilobytes: int) -> list[str]:
    """Python standard library source files, in sorted order, until `kilobytes` of UTF-8 text."""
    root = Path(os.__file__).parent
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode("utf-8"))
        if total >= kilobytes * 1024:
            break
    return docs


def train(directory: str, docs: list[str], vocab_size: int) -> None:
    tk = HFTokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(docs, trainer)
    tk.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, f)


def timed(fn):
    """(result, CPU seconds of this process, wall seconds). The CPU time is the number compared: the
    machine may be shared, and both libraries run on this one thread (TOKENIZERS_PARALLELISM=false)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", type=int, default=1024, help="kilobytes of text to encode")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size of the trained BPE")
    parser.add_argument("--no-append", action="store_true", help="print only, do not write RESULTS.md")
    args = parser.parse_args()

    docs = stdlib_documents(args.kb)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        train(tmp, docs, args.vocab)
        ref = HFTokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
        ours = load_tokenizer(tmp)  # fresh: its word cache starts empty, so this is the cold-cache time

        ours_ids, ours_s, ours_wall = timed(lambda: [ours.encode(d) for d in docs])
        ref_ids, ref_s, ref_wall = timed(lambda: [ref.encode(d, add_special_tokens=False).ids for d in docs])
        _, warm_s, warm_wall = timed(lambda: [ours.encode(d) for d in docs])  # second pass: every word cached

    if ours_ids != ref_ids:
        bad = sum(a != b for a, b in zip(ours_ids, ref_ids))
        raise SystemExit(f"ids differ from tokenizers on {bad} of {len(docs)} documents")
    n_tokens = sum(map(len, ours_ids))
    mb = n_bytes / 1e6
    print(f"{len(docs)} documents, {n_bytes / 1024:.0f} KB, {n_tokens} tokens (vocab {ours.vocab_size}); ids identical")
    print(f"{'':22} {'cpu s':>8} {'wall s':>8} {'MB/s (cpu)':>11}")
    print(f"{'minirlhf (cold cache)':22} {ours_s:8.3f} {ours_wall:8.3f} {mb / ours_s:11.2f}")
    print(f"{'minirlhf (warm cache)':22} {warm_s:8.3f} {warm_wall:8.3f} {mb / warm_s:11.2f}")
    print(f"{'tokenizers ' + tokenizers.__version__:22} {ref_s:8.3f} {ref_wall:8.3f} {mb / ref_s:11.2f}")
    print(f"ratio ours/tokenizers throughput (cpu time): cold {ref_s / ours_s:.3f}, warm {ref_s / warm_s:.3f}")
    if not args.no_append:
        env_versions = versions("python", "tokenizers")
        device = f"cpu ({cpu_name()}, 1 thread)"
        date = today()
        shape = f"{n_bytes / 1024:.0f} KB, {len(docs)} docs, vocab {ours.vocab_size}"
        append_rows([
            [date, "tokenizer encode: minirlhf byte-level BPE (cold cache) vs tokenizers", shape,
             f"cpu {ours_s:.3f} s (tokenizers {ref_s:.3f} s)", f"{mb / ours_s:.2f} MB/s",
             f"{ref_s / ours_s:.3f}", "-", device, env_versions],
            [date, "tokenizer encode: minirlhf byte-level BPE (warm cache) vs tokenizers", shape,
             f"cpu {warm_s:.3f} s (tokenizers {ref_s:.3f} s)", f"{mb / warm_s:.2f} MB/s",
             f"{ref_s / warm_s:.3f}", "-", device, env_versions],
        ])


if __name__ == "__main__":
    main()
