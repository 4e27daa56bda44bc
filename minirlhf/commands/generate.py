"""minirlhf generate --model DIR --prompts FILE.jsonl --out OUT.jsonl [--samples N] [--temperature T] ...

Answers every prompt of FILE with the model, in batches, and writes one row per answer to OUT: the input
row's fields plus

    answer          the decoded answer (special tokens and the stop token left out)
    tokens          its number of tokens (the stop token not counted)
    finish_reason   "stop" (the model ended its turn) or "length" (cut at --max-new-tokens)
    prompt_index    the row's position in FILE (0-based, blank lines not counted)
    sample_index    0 .. N-1 with --samples N

Rows of FILE are {"prompt": "..."} (one user turn), {"prompt": [turns]} or {"messages": [turns]} (a final
assistant turn, a reference answer, is left out), rendered through the model's chat template; with --raw,
{"prompt": "..."} is continued as plain text. A "system" field (or --system) adds a system turn.

Prompts are sorted by length so that each left-padded batch wastes little; a progress bar shows the
answers done. OUT is resumable: rerun the same command and the rows already there are skipped. An OUT
that is not a previous run of this command (OUT.jsonl.meta.json records its arguments) is refused, never
overwritten. When done, OUT is in prompt order. Greedy (--temperature 0, the default) answers do not
depend on the batch (up to float rounding); sampled ones are reproducible for the same arguments and
--batch-size. --compile (each decode step through torch.compile, see add_compile_argument) changes the
speed, not the answers (up to float rounding): it is not among the recorded arguments, so a run started
with it may be resumed without it and the other way round.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from minirlhf.commands import CommandError
from minirlhf.commands.loading import add_model_arguments
from minirlhf.commands.sampling import Sampling, add_sampling_arguments, sampling_from_args

if TYPE_CHECKING:
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

HELP = "answer every prompt of a .jsonl file in batches (resumable) and write the answers to a .jsonl file"
DEFAULTS = Sampling(temperature=0.0, max_new_tokens=256)
ADDED_FIELDS = ("tokens", "finish_reason", "prompt_index", "sample_index")  # besides --answer-field


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="a .jsonl (or .json array) of rows with 'prompt' (a string or turns) or 'messages'")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="where the answers go; rerunning the same command resumes it")
    add_sampling_arguments(p, DEFAULTS)
    p.add_argument("--samples", type=int, default=1, metavar="N", help="answers per prompt (default 1; N > 1 "
                                                                       "needs --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences generated together (default 16)")
    p.add_argument("--raw", action="store_true", help="continue each 'prompt' as plain text, no chat template")
    p.add_argument("--system", metavar="TEXT", help="system prompt for rows that have none")
    p.add_argument("--answer-field", default="answer", metavar="NAME",
                   help="output field of the generated text (default 'answer'; e.g. 'completion' when the "
                        "prompts carry a reference 'answer')")
    add_compile_argument(p)


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """--compile, as generate and eval take it (chat decodes in its own loop, without it)."""
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (minirlhf.generation.compiled_step): the first batch "
                        "compiles (tens of seconds on a CPU; each model its own), and the first batch of a new "
                        "prompt length, of a new batch size and of size 1 may each compile once more; later "
                        "batches reuse those, 3-13%% faster a step than the default on SmolLM2-135M, so it "
                        "pays off for long runs only (default off)")


# --------------------------------------------------------------------------------------------------
# prompts in, answers out


@dataclass
class Prompt:
    """One row of the prompts file: index (0-based among the rows), line (1-based in the file), the row
    as read, and its prompt's token ids [P]."""

    index: int
    line: int
    row: dict
    ids: list[int]


@dataclass
class Answer:
    """One answer to prompt `index`: ids [N] are its tokens, the stop token included when it stopped;
    tokens counts the answer's tokens as generated, without the stop token."""

    index: int
    sample: int
    ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int


def read_prompts(path: str | Path, tok: "Tokenizer", raw: bool = False, system: str | None = None) -> list[Prompt]:
    """Every row of a prompts file, tokenized; a malformed row is a DataError naming file:line."""
    from minirlhf.data_files import DataError, read_all

    rows, _ = read_all([str(path)])
    if not rows:
        raise DataError(f"{path}: no prompts in the file")
    return encode_rows(rows, tok, raw, system)


def encode_rows(rows: Sequence[tuple[str, int, dict]], tok: "Tokenizer", raw: bool = False,
                system: str | None = None, indices: Sequence[int] | None = None) -> list[Prompt]:
    """Prompts from (file, line, row) triples: the chat template over the row's prompt or messages (as the
    ppo stage renders its prompts, data.encode_prompt), or with raw the 'prompt' string as it is.
    indices: each row's prompt_index (default 0, 1, 2, ...)."""
    from functools import partial

    from minirlhf.config import DataSection
    from minirlhf.data import encode_prompt
    from minirlhf.data_files import DataError, load_examples

    if raw:
        encoded = []
        for file, line, row in rows:
            text = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text:
                raise DataError(f"{file}:{line}: --raw needs a non-empty string field 'prompt' in every row")
            encoded.append(tok.encode(text, add_bos=bool(tok.config.get("add_bos_token"))))
    else:
        with_system = [(f, n, {"system": system, **r} if system and isinstance(r, dict) else r) for f, n, r in rows]
        encode = partial(encode_prompt, tok=tok, data=DataSection(), max_len=1 << 62)
        encoded = [e["input_ids"] for e in load_examples([], encode, rows=with_system)[0]]
    indices = range(len(rows)) if indices is None else indices
    return [Prompt(i, line, row, ids) for i, (_, line, row), ids in zip(indices, rows, encoded)]


def check_fits(prompts: Sequence[Prompt], path: str | Path, max_new_tokens: int, max_positions: int) -> None:
    """Every prompt plus its longest answer must fit the model's positions."""
    from minirlhf.data_files import DataError

    for p in prompts:
        if len(p.ids) + max_new_tokens > max_positions:
            raise DataError(f"{path}:{p.line}: the prompt has {len(p.ids)} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it exceeds the model's {max_positions} positions")


def decode_answer(tok: "Tokenizer", index: int, sample: int, ids: list[int]) -> Answer:
    """An Answer from the generated ids of one row (pads already dropped)."""
    stopped = bool(ids) and ids[-1] in tok.stop_ids
    text = tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
    return Answer(index, sample, ids, text, "stop" if stopped else "length", len(ids) - stopped)


def generate_answers(model: "Transformer", tok: "Tokenizer", prompts: Sequence[Prompt], sampling: Sampling,
                     samples: int = 1, batch_size: int = 16, skip: set[tuple[int, int]] = frozenset(),
                     progress: bool = True, by_length: bool = True, compile: bool = False
                     ) -> Iterator[list[Answer]]:
    """Answer `samples` times each prompt, except the (index, sample) pairs in skip; one list per batch.

    by_length sorts the work longest prompt first, so a batch holds prompts of similar length (little
    padding), and the first batch shows at once whether the longest one fits in memory; otherwise the
    prompts go in file order. Prompts are left padded (batching.collate_prompts), as minirlhf.generation
    expects. One seeded generator draws every sample, batch after batch. compile: each decode step through
    torch.compile (minirlhf.generation.compiled_step; the same answers up to float rounding).
    """
    import torch
    from tqdm import tqdm

    from minirlhf.batching import collate_prompts

    device = model.embed_tokens.weight.device
    work = [(p, s) for p in prompts for s in range(samples) if (p.index, s) not in skip]
    if by_length:
        work.sort(key=lambda w: (-len(w[0].ids), w[0].index, w[1]))
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    with tqdm(total=len(work), desc="generate", unit="answer", dynamic_ncols=True, disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(work), batch_size):
            chunk = work[start: start + batch_size]
            batch = collate_prompts([{"input_ids": p.ids} for p, _ in chunk], tok.pad_id)
            out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 max_new_tokens=sampling.max_new_tokens, eos_token_id=tok.stop_ids,
                                 pad_token_id=tok.pad_id, generator=generator, compile=compile,
                                 **sampling.generate_kwargs())
            tokens, valid = out.tokens.tolist(), out.mask.tolist()
            answers = [decode_answer(tok, p.index, s, [t for t, v in zip(row, keep) if v])
                       for (p, s), row, keep in zip(chunk, tokens, valid)]
            bar.update(len(chunk))
            yield answers


def answer_row(prompt: Prompt, answer: Answer, answer_field: str) -> dict:
    return {**prompt.row, answer_field: answer.text, "tokens": answer.tokens, "finish_reason": answer.finish_reason,
            "prompt_index": answer.index, "sample_index": answer.sample}


def check_field_clash(prompts: Sequence[Prompt], path: str | Path, answer_field: str) -> None:
    from minirlhf.data_files import DataError

    added = (answer_field, *ADDED_FIELDS)
    for p in prompts:
        clash = [k for k in added if isinstance(p.row, dict) and k in p.row]
        if clash:
            hint = ("; write the generated text to another field, e.g. --answer-field completion"
                    if answer_field in clash else "")
            raise DataError(f"{path}:{p.line}: the row already has the field(s) {', '.join(clash)} that the "
                            f"output adds{hint}")


# --------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    from minirlhf.commands.answer_file import AnswerWriter, file_sha256
    from minirlhf.commands.loading import (
        load_chat_tokenizer,
        load_policy,
        resolve_device,
        resolve_dtype,
        resolve_model_paths,
    )

    sampling = sampling_from_args(args)
    if args.samples < 1:
        raise CommandError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and sampling.greedy:
        raise CommandError(f"--samples {args.samples} with greedy decoding gives {args.samples} copies of one "
                           f"answer; set --temperature > 0")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = resolve_model_paths(args.model, args.adapter)
    tok = load_chat_tokenizer(paths.tokenizer, args.template, quiet=args.raw)
    prompts = read_prompts(args.prompts, tok, raw=args.raw, system=args.system)
    check_field_clash(prompts, args.prompts, args.answer_field)
    arguments = {
        "model": str(paths.base.resolve()), "adapter": str(paths.adapter.resolve()) if paths.adapter else None,
        "merge": args.merge, "dtype": args.dtype, "template": args.template, "raw": args.raw, "system": args.system,
        "prompts": str(Path(args.prompts).resolve()), "prompts_sha256": file_sha256(Path(args.prompts)),
        "samples": args.samples, "answer_field": args.answer_field, **vars(sampling)}
    writer = AnswerWriter.open(args.out, arguments)
    total = len(prompts) * args.samples
    if len(writer.done) >= total:
        writer.close(total)
        print(f"{args.out}: all {total} answers are already there")
        return 0
    if writer.done:
        print(f"{args.out}: resuming, {len(writer.done)} of {total} answers already there", file=sys.stderr)

    device = resolve_device(args.device)
    model = load_policy(paths, merge=args.merge, dtype=resolve_dtype(args.dtype), device=device, tok=tok)
    check_fits(prompts, args.prompts, sampling.max_new_tokens, model.config.max_position_embeddings)
    by_index = {p.index: p for p in prompts}
    counts = {"stop": 0, "length": 0}
    new_tokens, started = 0, time.perf_counter()
    try:
        for answers in generate_answers(model, tok, prompts, sampling, args.samples, args.batch_size,
                                        skip=writer.done, compile=args.compile):
            writer.write(answer_row(by_index[a.index], a, args.answer_field) for a in answers)
            for a in answers:
                counts[a.finish_reason] += 1
                new_tokens += len(a.ids)
    finally:
        writer.close(total)
    seconds = time.perf_counter() - started
    print(f"{sum(counts.values())} answers -> {args.out} ({counts['stop']} stopped, {counts['length']} cut at "
          f"--max-new-tokens; {new_tokens / max(seconds, 1e-9):.1f} tokens/s)")
    return 0
