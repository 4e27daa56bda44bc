"""Score a policy on the demo task with the machinery of `minirlhf eval` (minirlhf/commands/evaluate.py):
sample answers to held-out prompts, judge them with the gold reward as a reward function, and measure the
policy's KL from a reference policy (the sft model) on those same samples.

    gold = mean_i gold_reward(prompt_i, answer_i),            answer_i ~ pi(. | prompt_i)
    KL(pi || ref) ~= mean_i sum_t [log pi(y_t | .) - log ref(y_t | .)]   (Monte Carlo, k1)

Samples are drawn at temperature 1 with a fixed seed, the distribution that the RL stages optimise, in
batches of 50 prompts in file order. Nearly the same numbers from the command line (which batches the
prompts by length, so each prompt draws other random numbers):

    minirlhf eval --policy runs/demo/ppo --reference runs/demo/sft --prompts runs/demo/data/eval_prompts.jsonl \\
        --reward-functions minirlhf.demo.evaluate:gold --no-greedy --samples 1 --max-new-tokens 48 --seed 1234
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minirlhf.demo.task import gold_reward, judge
from minirlhf.model import Transformer


@dataclass
class PolicyReport:
    gold: float
    kl_from_ref: float | None
    mean_length: float
    well_formed: float  # fraction of answers of at most two complete sentences (see `well_formed`)
    samples: list[tuple[str, str]]


def gold(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """The demo's judge as a reward function (the grpo / eval convention): gold_reward of each answer."""
    return [gold_reward(p, c.strip()) for p, c in zip(prompts, completions)]


def well_formed(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """1 for an answer in the task's form, one or two complete sentences (the judge finds no extra sentence,
    extra word or fragment), else 0: what sft teaches first, before the answers get good."""
    out = []
    for p, c in zip(prompts, completions):
        j = judge(p, c.strip())
        out.append(float(j.length_penalty == 0 and j.fragment_penalty == 0))
    return out


def load_policy(path: str | Path) -> Transformer:
    """A full model directory, or a LoRA adapter directory on top of the base it names."""
    from minirlhf.commands.loading import load_policy as load
    from minirlhf.commands.loading import resolve_model_paths

    return load(resolve_model_paths(path))


def evaluate_dir(model_dir: str | Path, tokenizer_dir: str | Path, prompts_file: str | Path,
                 ref_dir: str | Path | None = None, limit: int = 200, max_new_tokens: int = 48,
                 batch_size: int = 50, seed: int = 1234) -> PolicyReport:
    """Gold score, KL from ref_dir (when given) and mean answer length of one policy on the first `limit`
    prompts of prompts_file, one answer each, sampled at temperature 1."""
    from minirlhf.commands.evaluate import EvalSettings, Side, evaluate
    from minirlhf.commands.generate import read_prompts
    from minirlhf.commands.sampling import Sampling
    from minirlhf.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    prompts = read_prompts(prompts_file, tok)[:limit]
    policy = Side(str(model_dir), model=load_policy(model_dir), tok=tok)
    settings = EvalSettings(Sampling(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed), samples=1,
                            greedy=False, batch_size=batch_size, resamples=0, progress=False,
                            by_length=False)
    report = evaluate(policy, prompts, settings, tok=tok, reward_functions=[gold, well_formed],
                      reference=load_policy(ref_dir) if ref_dir else None)
    return PolicyReport(gold=report.value("sampled/gold"), kl_from_ref=report.value("sampled/kl_from_reference"),
                        mean_length=report.value("sampled/length"),
                        well_formed=report.value("sampled/well_formed"),
                        samples=[(e["prompt"], e["answer"].strip()) for e in report.examples])
