"""minirlhf eval --policy A [--baseline B] [--reward-model RM] [--reward-functions mod:fn ...]
              [--reference R] [--perplexity FILE] --prompts FILE --out report.json

Measures a policy and writes one report: a JSON file (--out) and a markdown table on the terminal. Each
number is a mean over prompts with a 95% bootstrap interval (see minirlhf/commands/report.py).

  --reward-model RM [--baseline B]
      mean reward-model score of A's answers (and of B's), and the win rate of A over B on the same
      prompts: P(score(A's answer) > score(B's answer)), ties counted 1/2. Each answer is scored as ppo
      scores it: the prompt's tokens, the answer's, its stop token. RM must share A's vocabulary.
  --reward-functions mod:fn|file.py:fn ...
      Python reward functions, as the grpo stage takes them: fn(prompts, completions, **fields) returns a
      float (or None: not applicable) per completion; fields are the prompt rows' other columns (e.g. a
      reference `answer`). Reported as the mean over greedy answers (accuracy, for 0/1 rewards) and over
      --samples k sampled answers (pass@1, the mean over k samples of each prompt).
  --reference R
      KL(A || R) on A's own samples, Monte Carlo (k1): the mean over sampled answers y of
      sum_t [log A(y_t | x, y_<t) - log R(y_t | x, y_<t)] (Schulman 2020, "Approximating KL divergence").
      Needs samples drawn from A itself: --temperature 1, no --top-p / --top-k.
  --perplexity FILE
      token-weighted perplexity exp(sum NLL / tokens) of a text file (.txt paragraphs or {"text"} rows)
      or a chat file ({"messages"} / alpaca rows: the assistant tokens only).

A and B are model directories (answers generated here, greedy unless --no-greedy, plus --samples k
sampled at --temperature) or answer files written by `minirlhf generate` (their settings are used for
the other side too). Example, the demo's ppo policy against its sft policy:

  minirlhf eval --policy runs/demo/ppo --baseline runs/demo/sft --reward-model runs/demo/rm \\
      --prompts runs/demo/data/eval_prompts.jsonl --out runs/demo/eval_ppo_vs_sft.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from minirlhf.commands import CommandError
from minirlhf.commands.generate import Answer, Prompt, add_compile_argument
from minirlhf.commands.loading import add_model_arguments
from minirlhf.commands.measures import (
    Key,
    RewardFunction,
    answer_logprobs,
    function_name,
    load_reward_functions,
    per_prompt,
    perplexity_documents,
    perplexity_metric,
    prompt_value,
    reward_function_scores,
    reward_model_scores,
    win_scores,
)
from minirlhf.commands.report import Report, mean_metric
from minirlhf.commands.sampling import Sampling, add_sampling_arguments

if TYPE_CHECKING:
    from minirlhf.heads import RewardModel
    from minirlhf.model import Transformer
    from minirlhf.tokenizer import Tokenizer

HELP = ("evaluate a policy: reward-model score and win rate over a baseline, reward-function accuracy and "
        "pass@1, perplexity, KL from a reference (JSON report + markdown table)")
DEFAULTS = Sampling(temperature=1.0, max_new_tokens=256)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, flag="--policy", or_file="the answers file of a `minirlhf generate` run")
    p.add_argument("--baseline", metavar="DIR|FILE",
                   help="the policy to compare with (win rate, needs --reward-model): a model directory or a "
                        "`minirlhf generate` output")
    p.add_argument("--prompts", metavar="FILE", help="prompts to answer (.jsonl rows with 'prompt' or 'messages', "
                                                     "plus any fields the reward functions read)")
    p.add_argument("--reward-model", metavar="DIR", help="a reward model directory (an rm run's output_dir)")
    p.add_argument("--reward-functions", nargs="+", default=[], metavar="MOD:FN",
                   help="reward functions 'package.module:fn' or 'path/to/file.py:fn'")
    p.add_argument("--reference", metavar="DIR", help="reference policy of the KL measurement (e.g. the sft model)")
    p.add_argument("--perplexity", metavar="FILE", help="text or chat file whose perplexity to measure")
    p.add_argument("--out", metavar="REPORT.json", help="write the report here (a new file, or an earlier report)")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="sampled answers per prompt, at --temperature (default 0; 1 with --reference)")
    p.add_argument("--no-greedy", dest="greedy", action="store_false",
                   help="skip the greedy answers (only the --samples ones)")
    add_sampling_arguments(p, DEFAULTS)
    p.add_argument("--limit", type=int, metavar="N", help="use the first N prompts only")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B",
                   help="bootstrap resamples of the 95%% intervals (default 1000; 0 = no intervals)")
    add_compile_argument(p)


# --------------------------------------------------------------------------------------------------
# the policies being compared


@dataclass
class Side:
    """A policy under evaluation: a loaded model (answers generated on the fly) or the rows of a
    `minirlhf generate` output (file_arguments: the arguments that wrote it)."""

    name: str
    model: "Transformer | None" = None
    tok: "Tokenizer | None" = None
    file_arguments: dict | None = None
    file_rows: list[dict] = field(default_factory=list)

    @property
    def is_file(self) -> bool:
        return self.file_arguments is not None

    @property
    def file_kind(self) -> str:
        return "greedy" if self.file_arguments["temperature"] == 0 else "sampled"


@dataclass
class EvalSettings:
    """greedy: one greedy answer per prompt; samples: k more at sampling.temperature. resamples: bootstrap.
    progress: say on stderr what is being generated, with a progress bar. by_length: batch the prompts
    sorted by length (faster), else in file order. compile: decode through torch.compile (generate
    --compile)."""

    sampling: Sampling = DEFAULTS
    samples: int = 0
    greedy: bool = True
    batch_size: int = 16
    resamples: int = 1000
    progress: bool = True
    by_length: bool = True
    compile: bool = False

    def kinds(self) -> list[str]:
        return (["greedy"] if self.greedy else []) + (["sampled"] if self.samples > 0 else [])

    def sampling_of(self, kind: str) -> tuple[Sampling, int]:
        """(decoding settings, answers per prompt) of an answer kind."""
        if kind == "greedy":
            return replace(self.sampling, temperature=0.0, top_p=1.0, top_k=0), 1
        return self.sampling, self.samples


def end_of_turn_id(tok: "Tokenizer") -> int:
    """The token that closes an assistant turn: the last of tok.stop_ids (set_chat_template appends the
    template's end-of-turn token after the eos ids)."""
    return tok.stop_ids[-1]


def file_answers(side: Side, tok: "Tokenizer | None", wanted: set[int]) -> dict[Key, Answer]:
    """A generate output's answers to the prompts in `wanted`; with a tokenizer, each re-encoded (plus the
    end-of-turn token when it stopped) for the models that score it."""
    field_name = side.file_arguments["answer_field"]
    answers = {}
    for row in side.file_rows:
        if row["prompt_index"] not in wanted:
            continue
        text, finish, tokens = row.get(field_name), row.get("finish_reason"), row.get("tokens")
        if not isinstance(text, str) or finish not in ("stop", "length") or not isinstance(tokens, int):
            raise CommandError(f"{side.name}: the row of prompt_index {row['prompt_index']} sample "
                               f"{row['sample_index']} lacks a string '{field_name}', an int 'tokens' or a "
                               f"finish_reason stop|length")
        ids = [] if tok is None else tok.encode(text) + ([end_of_turn_id(tok)] if finish == "stop" else [])
        answers[(row["prompt_index"], row["sample_index"])] = Answer(row["prompt_index"], row["sample_index"], ids,
                                                                     text, finish, tokens)
    return answers


def side_answers(side: Side, prompts: Sequence[Prompt], settings: EvalSettings, kind: str,
                 tok: "Tokenizer | None") -> dict[Key, Answer]:
    """Every (prompt, sample) answer of one kind: generated by the side's model or read from its file."""
    from minirlhf.commands.generate import generate_answers

    sampling, samples = settings.sampling_of(kind)
    if side.is_file:
        answers = file_answers(side, tok, {p.index for p in prompts})
    else:
        if settings.progress:
            print(f"eval: {samples * len(prompts)} {kind} answers from {side.name}", file=sys.stderr)
        answers = {}
        for batch in generate_answers(side.model, side.tok, prompts, sampling, samples, settings.batch_size,
                                      progress=settings.progress, by_length=settings.by_length,
                                      compile=settings.compile):
            answers.update(((a.index, a.sample), a) for a in batch)
    missing = [(p.index, s) for p in prompts for s in range(samples) if (p.index, s) not in answers]
    if missing:
        raise CommandError(f"{side.name}: no answer for prompt_index {missing[0][0]} sample {missing[0][1]} (and "
                           f"{len(missing) - 1} more); an unfinished `minirlhf generate` run? rerun it to complete it")
    return answers


# --------------------------------------------------------------------------------------------------
# the evaluation


def evaluate(policy: Side, prompts: Sequence[Prompt], settings: EvalSettings, *, tok: "Tokenizer | None" = None,
             baseline: Side | None = None, reward_model: "RewardModel | None" = None,
             reward_functions: Sequence[RewardFunction] = (), reference: "Transformer | None" = None,
             perplexity_file: str | Path | None = None, seed: int = 0) -> Report:
    """Every metric the inputs allow, for each answer kind of the settings (greedy, sampled).

    tok: the tokenizer of the prompts' ids, shared by every model involved (the policy's).
    """
    report = Report(inputs={"policy": policy.name, "baseline": baseline.name if baseline else None},
                    settings={"bootstrap_resamples": settings.resamples, "seed": seed, "prompts": len(prompts),
                              "samples": settings.samples, "greedy": settings.greedy, **vars(settings.sampling)})
    by_index = {p.index: p for p in prompts}
    B = settings.resamples
    pad_id = tok.pad_id if tok is not None else 0
    for kind in settings.kinds() if prompts else []:
        answers = side_answers(policy, prompts, settings, kind, tok)
        what = "greedy answers" if kind == "greedy" else f"{settings.samples} sampled answer(s) per prompt"
        lengths = {k: a.tokens + (a.finish_reason == "stop") for k, a in answers.items()}
        report.metrics.append(mean_metric(f"{kind}/length", per_prompt(lengths), B, seed,
                                          f"tokens generated per answer (stop included), {what}"))
        if reward_model is not None:
            scores = reward_model_scores(reward_model, by_index, answers, pad_id, settings.batch_size)
            report.metrics.append(mean_metric(f"{kind}/reward", per_prompt(scores), B, seed,
                                              f"mean reward-model score of the policy, {what}"))
            if baseline is not None:
                other = side_answers(baseline, prompts, settings, kind, tok)
                other_scores = reward_model_scores(reward_model, by_index, other, pad_id, settings.batch_size)
                report.metrics.append(mean_metric(f"{kind}/baseline_reward", per_prompt(other_scores), B, seed,
                                                  f"mean reward-model score of the baseline, {what}"))
                report.metrics.append(mean_metric(f"{kind}/win_rate", per_prompt(win_scores(scores, other_scores)),
                                                  B, seed, "P(policy's answer scores above the baseline's), "
                                                           "ties 1/2"))
        label = ("mean reward (accuracy for 0/1 rewards)" if kind == "greedy" else
                 "mean reward over samples (pass@1 for 0/1 rewards)")
        scored = reward_function_scores(reward_functions, by_index, answers) if reward_functions else []
        for fn, scores in zip(reward_functions, scored):
            report.metrics.append(mean_metric(f"{kind}/{function_name(fn)}", per_prompt(scores), B, seed,
                                              f"{label}, {what}"))
        if reference is not None and kind == "sampled":
            own = answer_logprobs(policy.model, by_index, answers, pad_id, settings.batch_size)
            ref = answer_logprobs(reference, by_index, answers, pad_id, settings.batch_size)
            kl = {k: own[k] - ref[k] for k in own}
            report.metrics.append(mean_metric("sampled/kl_from_reference", per_prompt(kl), B, seed,
                                              "KL(policy || reference) per answer, Monte Carlo k1 on the policy's "
                                              "samples"))
        first = min(answers)
        report.examples.append({"kind": kind, "prompt": prompt_value(by_index[first[0]].row),
                                "answer": answers[first].text})
    if perplexity_file is not None:
        docs = perplexity_documents(policy.model, tok, perplexity_file, settings.batch_size)
        report.metrics.append(perplexity_metric(docs, B, seed))
    return report


# --------------------------------------------------------------------------------------------------
# the command


def _load_side(target: str, adapter: str | None, merge: bool, dtype, device, template: str | None) -> Side:
    """A model directory (loaded) or a `minirlhf generate` output file (read)."""
    from minirlhf.commands.answer_file import read_answer_file
    from minirlhf.commands.loading import load_chat_tokenizer, load_policy, resolve_model_paths

    if Path(target).is_file():
        if adapter is not None:
            raise CommandError(f"--adapter applies to a model directory, but {target} is a file")
        arguments, rows = read_answer_file(target)
        return Side(target, file_arguments=arguments, file_rows=rows)
    paths = resolve_model_paths(target, adapter)
    tok = load_chat_tokenizer(paths.tokenizer, template)
    model = load_policy(paths, merge=merge, dtype=dtype, device=device, tok=tok)
    return Side(paths.describe(), model=model, tok=tok)


def _settings(args: argparse.Namespace, files: Sequence[Side]) -> EvalSettings:
    """The answer kinds and decoding settings: from the flags, or from the answer files when given."""
    from minirlhf.commands.sampling import sampling_from_args

    samples = args.samples if args.samples is not None else (1 if args.reference else 0)
    settings = EvalSettings(sampling_from_args(args), samples, args.greedy, args.batch_size, args.bootstrap,
                            compile=args.compile)
    if samples < 0 or args.batch_size < 1 or args.bootstrap < 0:
        raise CommandError("--samples and --bootstrap must be >= 0, --batch-size >= 1")
    kinds = {f.file_kind for f in files}
    if len(kinds) > 1 or len({f.file_arguments["samples"] for f in files}) > 1:
        raise CommandError("the answer files differ in temperature or --samples; they cannot be compared")
    if files:
        a = files[0].file_arguments
        sampling = Sampling(a["temperature"], a["top_p"], a["top_k"], a["max_new_tokens"], a["seed"])
        if files[0].file_kind == "greedy":
            return replace(settings, sampling=replace(settings.sampling, max_new_tokens=a["max_new_tokens"]),
                           samples=0, greedy=True)
        return replace(settings, sampling=sampling, samples=a["samples"], greedy=False)
    if not settings.kinds():
        raise CommandError("--no-greedy without --samples leaves no answers to evaluate")
    return settings


def _check_request(args: argparse.Namespace) -> None:
    if not (args.reward_model or args.reward_functions or args.reference or args.perplexity):
        raise CommandError("nothing to measure: give --reward-model, --reward-functions, --reference and/or "
                           "--perplexity")
    if args.baseline and not args.reward_model:
        raise CommandError("--baseline is compared with the policy through --reward-model; give one")


def _prompt_rows(args: argparse.Namespace, files: Sequence[Side]) -> tuple[list[tuple[str, int, dict]], list[int],
                                                                            bool, str | None]:
    """(file, line, row) triples of the prompts, their prompt_index, and the raw/system options that encode
    them: from --prompts, else from the first answer file's rows (their generated fields removed)."""
    from minirlhf.commands.answer_file import file_sha256
    from minirlhf.commands.generate import ADDED_FIELDS
    from minirlhf.data_files import read_all

    meta = files[0].file_arguments if files else {}
    raw, system = bool(meta.get("raw")), meta.get("system")
    if args.prompts:
        digest = file_sha256(Path(args.prompts)) if Path(args.prompts).is_file() else None
        for f in files:
            if digest and f.file_arguments.get("prompts_sha256") != digest:
                raise CommandError(f"{f.name} answers another prompts file than --prompts {args.prompts}")
        rows, _ = read_all([args.prompts])
        return rows, list(range(len(rows))), raw, system
    if not files:
        return [], [], raw, system
    source = files[0]
    seen, rows, indices = set(), [], []
    dropped = {source.file_arguments["answer_field"], *ADDED_FIELDS}
    for line, row in enumerate(source.file_rows, start=1):
        if row["prompt_index"] not in seen:
            seen.add(row["prompt_index"])
            rows.append((source.name, line, {k: v for k, v in row.items() if k not in dropped}))
            indices.append(row["prompt_index"])
    order = sorted(range(len(rows)), key=lambda j: indices[j])
    return [rows[j] for j in order], [indices[j] for j in order], raw, system


def run(args: argparse.Namespace) -> int:
    from minirlhf.commands.generate import encode_rows
    from minirlhf.commands.loading import (
        check_same_vocabulary,
        load_chat_tokenizer,
        load_policy,
        load_reward_model,
        resolve_device,
        resolve_dtype,
        resolve_model_paths,
    )
    from minirlhf.commands.report import check_report_path, write_report

    _check_request(args)
    out = check_report_path(args.out) if args.out else None
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    reward_functions = load_reward_functions(args.reward_functions) if args.reward_functions else []
    policy = _load_side(args.policy, args.adapter, args.merge, dtype, device, args.template)
    baseline = _load_side(args.baseline, None, True, dtype, device, args.template) if args.baseline else None
    files = [s for s in (policy, baseline) if s is not None and s.is_file]
    if (args.reference or args.perplexity) and policy.is_file:
        raise CommandError("--reference and --perplexity need the policy's model: give --policy as a model directory")
    settings = _settings(args, files)
    if args.reference and (settings.samples == 0 or settings.sampling.temperature != 1
                           or settings.sampling.top_p < 1 or settings.sampling.top_k):
        raise CommandError("--reference measures KL on the policy's own samples: use --samples >= 1 at "
                           "--temperature 1 without --top-p / --top-k")

    models = [s for s in (policy, baseline) if s is not None and not s.is_file]
    tok = models[0].tok if models else None
    reward_model = None
    if args.reward_model:
        rm_paths = resolve_model_paths(args.reward_model)
        rm_tok = load_chat_tokenizer(rm_paths.tokenizer, args.template, quiet=True)
        for side in models:
            check_same_vocabulary(side.tok, f"policy {side.name}", rm_tok, f"reward model {args.reward_model}")
        tok = tok or rm_tok
        reward_model = load_reward_model(args.reward_model, dtype, device)
    for side in models[1:]:
        check_same_vocabulary(models[0].tok, f"policy {models[0].name}", side.tok, f"baseline {side.name}")
    reference = None
    if args.reference:
        ref_paths = resolve_model_paths(args.reference)
        check_same_vocabulary(policy.tok, f"policy {policy.name}",
                              load_chat_tokenizer(ref_paths.tokenizer, quiet=True), f"reference {args.reference}")
        reference = load_policy(ref_paths, dtype=dtype, device=device)

    needs_answers = bool(args.reward_model or reward_functions or args.reference)
    rows, indices, raw, system = _prompt_rows(args, files) if needs_answers else ([], [], False, None)
    if needs_answers and not rows:
        raise CommandError("no prompts: give --prompts FILE (or an answer file as --policy)")
    if args.limit is not None:
        rows, indices = rows[: args.limit], indices[: args.limit]
    if tok is not None:
        prompts = encode_rows(rows, tok, raw, system, indices)
    else:
        prompts = [Prompt(i, line, row, []) for i, (_, line, row) in zip(indices, rows)]
    report = evaluate(policy, prompts, settings, tok=tok, baseline=baseline, reward_model=reward_model,
                      reward_functions=reward_functions, reference=reference, perplexity_file=args.perplexity,
                      seed=args.seed)
    report.inputs.update(reward_model=args.reward_model, reward_functions=list(args.reward_functions),
                         reference=args.reference, perplexity=args.perplexity,
                         prompts=args.prompts or (files[0].file_arguments.get("prompts") if files else None))
    print(report.markdown())
    if out is not None:
        write_report(report, out)
        print(f"report: {out}")
    return 0
