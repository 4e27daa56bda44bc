"""The demo's data sets, one per stage, generated from the task grammar and labelled by the gold judge.

    file                 rows                                   stage
    pt.jsonl             {"text"}: a 3-6 sentence review        pt   (the language)
    sft.jsonl            {"instruction", "input", "output"}     sft  (answer in 1-2 sentences, then stop)
    preference.jsonl     {"prompt", "chosen", "rejected"}       rm, dpo, ipo, simpo, orpo
    kto.jsonl            {"prompt", "completion", "label"}      kto  (label: gold > 0)
    ppo_prompts.jsonl    {"prompt"}                             ppo  (prompts held out of the above)
    eval_prompts.jsonl   {"prompt"}                             gold score of every stage (held out)

Prompts are split per topic: of the ten prompt templates, one is kept for evaluation, one for ppo and
eight for the sft, preference and kto rows, so every topic is seen in training but the ppo and eval
requests are worded as never before. The sft answers are balanced over STANCES (positive and negative
mirror each other), so an sft model scores about 0. Preference pairs prefer the answer with the higher
gold reward (by at least MIN_PAIR_MARGIN); a quarter of the candidates are hacks (`sample_corruption`),
which only ever appear as the rejected answer, so no pair teaches a hack. Then each pair is flipped
with probability `label_noise` (default 0.1) to imitate noisy annotators; kto rows are labelled
desirable exactly when their gold reward is > 0, without noise. Every file has its own random stream,
derived from `seed` and the file name, so the same seed gives byte-identical files and changing one
size leaves the other files unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from minirlhf.demo.task import (
    PROMPT_TEMPLATES,
    TOPICS,
    gold_reward,
    make_prompt,
    prompt_topic,
    sample_corruption,
    sample_document,
    sample_response,
)

# Rows per file: a few thousand short rows, which a ~2M-parameter model goes through in minutes on CPU.
DEFAULT_SIZES: Mapping[str, int] = MappingProxyType(
    {"pt": 4000, "sft": 3000, "preference": 3000, "kto": 3000, "ppo": 1000, "eval": 200}
)
FILE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "pt": "pt.jsonl",
        "sft": "sft.jsonl",
        "preference": "preference.jsonl",
        "kto": "kto.jsonl",
        "ppo": "ppo_prompts.jsonl",
        "eval": "eval_prompts.jsonl",
    }
)
# sft answers: equal shares of praise and complaint, so the mean gold reward is 0.
SFT_STANCE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"positive": 0.3, "negative": 0.3, "neutral": 0.2, "mixed": 0.2}
)
CORRUPTION_RATE = 0.25  # share of preference / kto candidates that are hacks (see sample_corruption)
MIN_PAIR_MARGIN = 0.25  # chosen and rejected differ by at least this much gold reward


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"minirlhf-demo:{seed}:{name}")


def resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    """DEFAULT_SIZES updated by `sizes`; ValueError on an unknown key or a negative size."""
    out = dict(DEFAULT_SIZES)
    for key, n in (sizes or {}).items():
        if key not in DEFAULT_SIZES:
            raise ValueError(f"demo data: unknown size key {key!r}; expected one of {sorted(DEFAULT_SIZES)}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"demo data: sizes[{key!r}] must be an int >= 0, got {n!r}")
        out[key] = n
    return out


def split_prompts(seed: int = 0) -> dict[str, list[str]]:
    """Every prompt, split into "train" (8 templates per topic), "ppo" (1) and "eval" (1)."""
    rng = _rng(seed, "split")
    split: dict[str, list[str]] = {"train": [], "ppo": [], "eval": []}
    for topic in TOPICS:
        order = list(range(len(PROMPT_TEMPLATES)))
        rng.shuffle(order)
        split["eval"].append(make_prompt(topic, order[0]))
        split["ppo"].append(make_prompt(topic, order[1]))
        split["train"].extend(make_prompt(topic, t) for t in order[2:])
    return split


def _stance(rng: random.Random) -> str:
    return rng.choices(list(SFT_STANCE_WEIGHTS), weights=list(SFT_STANCE_WEIGHTS.values()))[0]


def _candidate(rng: random.Random, prompt: str) -> tuple[str, bool]:
    """An answer as an annotator might see it, usually well-formed, sometimes (True) a hack."""
    if rng.random() < CORRUPTION_RATE:
        return sample_corruption(rng, prompt), True
    return sample_response(rng, prompt_topic(prompt), _stance(rng)), False


def _cycled(rng: random.Random, prompts: list[str], n: int) -> list[str]:
    """n prompts going round `prompts` in shuffled passes, so each appears n/len(prompts) times +-1."""
    out: list[str] = []
    while len(out) < n:
        batch = list(prompts)
        rng.shuffle(batch)
        out.extend(batch)
    return out[:n]


def build_demo_rows(
    seed: int = 0, sizes: Mapping[str, int] | None = None, label_noise: float = 0.1
) -> dict[str, list[dict[str, Any]]]:
    """The rows of every demo file, keyed like FILE_NAMES (see the module docstring)."""
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"demo data: label_noise must be in [0, 0.5], got {label_noise}")
    n = resolve_sizes(sizes)
    split = split_prompts(seed)
    rows: dict[str, list[dict[str, Any]]] = {}

    rng = _rng(seed, "pt")
    rows["pt"] = [{"text": sample_document(rng, rng.choice(TOPICS))} for _ in range(n["pt"])]

    rng = _rng(seed, "sft")
    rows["sft"] = []
    for _ in range(n["sft"]):
        prompt = rng.choice(split["train"])
        answer = sample_response(rng, prompt_topic(prompt), _stance(rng))
        rows["sft"].append({"instruction": prompt, "input": "", "output": answer})

    rng = _rng(seed, "preference")
    rows["preference"] = []
    while len(rows["preference"]) < n["preference"]:
        prompt = rng.choice(split["train"])
        (a, hack_a), (b, hack_b) = _candidate(rng, prompt), _candidate(rng, prompt)
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        flip = rng.random() < label_noise  # drawn for every pair: noise never changes which pairs
        if ga < gb:
            a, b, ga, gb, hack_a = b, a, gb, ga, hack_b
        if ga - gb < MIN_PAIR_MARGIN or hack_a:
            continue
        chosen, rejected = a, b
        if flip:
            chosen, rejected = rejected, chosen
        rows["preference"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    rng = _rng(seed, "kto")
    rows["kto"] = []
    for _ in range(n["kto"]):
        prompt = rng.choice(split["train"])
        completion, _ = _candidate(rng, prompt)
        label = gold_reward(prompt, completion) > 0
        rows["kto"].append({"prompt": prompt, "completion": completion, "label": label})

    rows["ppo"] = [{"prompt": p} for p in _cycled(_rng(seed, "ppo"), split["ppo"], n["ppo"])]
    rows["eval"] = [{"prompt": p} for p in _cycled(_rng(seed, "eval"), split["eval"], n["eval"])]
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8, keys in insertion order."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def generate_demo_data(
    out_dir: str | Path, seed: int = 0, sizes: Mapping[str, int] | None = None, label_noise: float = 0.1
) -> dict[str, Path]:
    """Write every demo file (FILE_NAMES) into `out_dir` and return their paths, keyed like FILE_NAMES."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, rows in build_demo_rows(seed, sizes, label_noise).items():
        paths[key] = out / FILE_NAMES[key]
        write_jsonl(paths[key], rows)
    return paths


def tokenizer_corpus(seed: int = 0, sizes: Mapping[str, int] | None = None) -> list[str]:
    """Texts to train the demo's SentencePiece model on: the pt documents, the sft answers and every
    prompt of every topic (held-out wordings included, so no request is split into odd pieces)."""
    rows = build_demo_rows(seed, sizes)
    prompts = [make_prompt(topic, t) for topic in TOPICS for t in range(len(PROMPT_TEMPLATES))]
    return [r["text"] for r in rows["pt"]] + [r["output"] for r in rows["sft"]] + prompts
