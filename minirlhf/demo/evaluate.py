"""Score a policy on the demo task: sample answers to held-out prompts, judge them with the gold
reward, and estimate the policy's KL from a reference policy (the sft model) on those same samples.

    gold = mean_i gold_reward(prompt_i, answer_i),            answer_i ~ pi(. | prompt_i)
    KL(pi || ref) ~= mean_i sum_t [log pi(y_t | .) - log ref(y_t | .)]   (Monte Carlo, k1)

Samples are drawn at temperature 1 with a fixed seed, the distribution that the RL stages optimise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from minirlhf.data import collate_prompts
from minirlhf.demo.task import gold_score
from minirlhf.logprobs import label_logprobs
from minirlhf.model import Transformer
from minirlhf.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PolicyReport:
    gold: float
    kl_from_ref: float | None
    mean_length: float
    samples: list[tuple[str, str]]


def load_policy(path: str | Path) -> Transformer:
    """A full model directory, or a LoRA adapter directory on top of its base."""
    path = Path(path)
    if (path / "config.json").exists():
        return Transformer.from_pretrained(path).eval()
    from minirlhf.lora import load_adapter, merge_and_unload

    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return merge_and_unload(load_adapter(Transformer.from_pretrained(base), path)).eval()


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows][:limit]


@torch.no_grad()
def evaluate_policy(policy: Transformer, tok: Tokenizer, prompts: list[str], ref: Transformer | None = None,
                    max_new_tokens: int = 48, batch_size: int = 50, seed: int = 1234) -> PolicyReport:
    generator = torch.Generator().manual_seed(seed)
    answers, kls, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        encoded = [{"input_ids": tok.apply_chat_template([{"role": "user", "content": p}],
                                                         add_generation_prompt=True).ids} for p in chunk]
        prompts_batch = collate_prompts(encoded, tok.pad_id)  # left padded for generation
        ids, mask = prompts_batch["input_ids"], prompts_batch["attention_mask"]
        out = policy.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=1.0,
                              eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id, generator=generator)
        for row, valid in zip(out.tokens.tolist(), out.mask.tolist()):
            kept = [t for t, v in zip(row, valid) if v and t not in tok.stop_ids]
            answers.append(tok.decode(kept, skip_special_tokens=True).strip())
        lengths += out.mask.sum(-1).tolist()
        if ref is not None:
            full_mask = torch.cat([mask, out.mask.long()], 1)
            labels = torch.where(torch.cat([torch.zeros_like(mask, dtype=torch.bool), out.mask], 1),
                                 out.sequences, -100)
            batch = {"input_ids": out.sequences, "attention_mask": full_mask, "labels": labels}
            diff = label_logprobs(policy, batch) - label_logprobs(ref, batch)
            kls += diff.sum(-1).tolist()
    return PolicyReport(
        gold=gold_score(prompts, answers),
        kl_from_ref=sum(kls) / len(kls) if kls else None,
        mean_length=sum(lengths) / len(lengths),
        samples=list(zip(prompts[:3], answers[:3])),
    )


def evaluate_dir(model_dir: str | Path, tokenizer_dir: str | Path, prompts_file: str | Path,
                 ref_dir: str | Path | None = None, limit: int = 200) -> PolicyReport:
    tok = load_tokenizer(str(tokenizer_dir))
    ref = load_policy(ref_dir) if ref_dir else None
    return evaluate_policy(load_policy(model_dir), tok, read_prompts(prompts_file, limit), ref)
