"""One side of one training-step benchmark, in a fresh process: build, step, print one JSON line.

benchmarks/train_step.py starts this once per side and repetition, so each process's peak RSS
(getrusage ru_maxrss) is that side's alone. Never imported by minirlhf.

    python benchmarks/step_worker.py TASK SIDE --model DIR --batch B --seq T --steps N

TASK: sft (full), lora (sft with LoRA r=16 on every linear), dpo (full policy + frozen reference),
ppo (the clipped policy loss on a rollout's answers, full policy). SIDE: ours or hf, then ":fp32" or
":bf16" (CPU autocast), then "+ckpt" for activation checkpointing and, ours only, "+compile" for
[train] compile (Transformer.compile_blocks), e.g. "ours:bf16+ckpt+compile", "hf:fp32".
hf means transformers, plus peft for lora, TRL's DPOTrainer for dpo, and TRL's selective_log_softmax
on the full logits for ppo (what TRL's GRPO/PPO trainers compute). Both sides use torch's fused AdamW,
transformers' Trainer default (optim="adamw_torch_fused"; DPOTrainer's own) and what our trainer builds on
CUDA (on a CPU it still steps foreach AdamW, ~0.4 s slower a step here; see minirlhf/trainer.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, CLIP = 0.1, 0.2


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def token_batch(batch: int, seq: int, vocab: int, prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens [B, T]; labels IGNORE on the first `prompt` tokens (the prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def ppo_inputs(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    """A rollout: prompts of T/4 tokens, answers of 3T/4 with a few pad tokens at the end of some rows,
    old log-probs and advantages as the update receives them."""
    data = token_batch(batch, seq, vocab, seq // 4, seed=3)
    P, N = seq // 4, seq - seq // 4
    g = torch.Generator().manual_seed(4)
    response_mask = torch.ones(batch, N, dtype=torch.bool)
    response_mask[1::2, -N // 8:] = False
    data["attention_mask"][:, P:] = response_mask.long()
    return {**data, "prompt_len": P, "response_mask": response_mask,
            "old_logprobs": -3.0 + 0.1 * torch.randn(batch, N, generator=g),
            "advantages": torch.randn(batch, N, generator=g)}


# --------------------------------------------------------------------------------------------------
# ours


def ours_step(task: str, model_dir: str, data: dict, ckpt: bool,
              compile_blocks: bool = False) -> tuple[Callable[[], torch.Tensor], list]:
    from minirlhf.logprobs import causal_lm_loss
    from minirlhf.lora import LoRAConfig, inject_lora
    from minirlhf.model import Transformer

    model = Transformer.from_pretrained(model_dir).train()
    model.activation_checkpointing = ckpt
    if task == "lora":
        inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules=LORA_TARGETS))
    if compile_blocks:
        model.compile_blocks()
    if task in ("sft", "lora"):
        return (lambda: causal_lm_loss(model, data)), model.parameters()
    if task == "dpo":
        from minirlhf.logprobs import pair_logprobs
        from minirlhf.losses import dpo_loss

        ref = Transformer.from_pretrained(model_dir).eval().requires_grad_(False)

        def dpo() -> torch.Tensor:
            with torch.no_grad():
                ref_sums, _ = pair_logprobs(ref, data)
            sums, _ = pair_logprobs(model, data)
            B = sums.shape[0] // 2
            losses, _, _ = dpo_loss(sums[:B], sums[B:], ref_sums[:B], ref_sums[B:], beta=BETA)
            return losses.mean()
        return dpo, model.parameters()
    from minirlhf.losses import ppo_policy_loss
    from minirlhf.stages.rollout import response_logprobs

    def ppo() -> torch.Tensor:
        logps, _ = response_logprobs(model, data["input_ids"], data["attention_mask"], data["response_mask"],
                                     data["prompt_len"])
        return ppo_policy_loss(logps, data["old_logprobs"], data["advantages"], data["response_mask"], CLIP)[0]
    return ppo, model.parameters()


# --------------------------------------------------------------------------------------------------
# transformers, peft, TRL


def hf_model(model_dir: str, ckpt: bool):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def hf_step(task: str, model_dir: str, data: dict, ckpt: bool, bf16: bool) -> tuple[Callable, list]:
    if task == "dpo":
        return trl_dpo_step(model_dir, data, ckpt, bf16)
    model = hf_model(model_dir, ckpt)
    if task == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
        if ckpt:
            model.enable_input_require_grads()
    if task in ("sft", "lora"):
        return (lambda: model(input_ids=data["input_ids"], labels=data["labels"]).loss), model.parameters()
    from trl.trainer.utils import selective_log_softmax

    from minirlhf.losses import ppo_policy_loss

    def ppo() -> torch.Tensor:
        P = data["prompt_len"]
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, P - 1:-1]
        logps = selective_log_softmax(logits, data["input_ids"][:, P:])
        return ppo_policy_loss(logps, data["old_logprobs"], data["advantages"], data["response_mask"], CLIP)[0]
    return ppo, model.parameters()


def trl_dpo_step(model_dir: str, data: dict, ckpt: bool, bf16: bool):
    """TRL's DPOTrainer, one optimizer step = training_step (its loss, backward) + the optimizer: text
    pairs whose prompt + answer tokenize to more than `seq` tokens, truncated to `seq` as ours are."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = data["chosen_input_ids"]
    B, T = ids.shape
    g = torch.Generator().manual_seed(5)

    def text(n: int) -> str:
        return tok.decode(torch.randint(1000, 40000, (n,), generator=g).tolist())

    rows = [{"prompt": text(T // 4), "chosen": text(T), "rejected": text(T)} for _ in range(B)]
    out = tempfile.mkdtemp()
    args = DPOConfig(output_dir=out, per_device_train_batch_size=B, max_length=T, beta=BETA, bf16=bf16,
                     use_cpu=True, gradient_checkpointing=ckpt, report_to=[], learning_rate=1e-6,
                     dataloader_num_workers=0, logging_steps=10_000, save_strategy="no")
    trainer = DPOTrainer(model=hf_model(model_dir, False), ref_model=hf_model(model_dir, False), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what train() would set
    inputs = next(iter(trainer.get_train_dataloader()))
    shape = tuple(inputs["input_ids"].shape) if "input_ids" in inputs else None

    def step() -> torch.Tensor:
        loss = trainer.training_step(trainer.model, inputs)  # forward, loss, backward (autocast inside)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss
    step.trl = True
    step.shape = shape
    return step, None


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["sft", "lora", "dpo", "ppo"])
    parser.add_argument("side")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    who, _, rest = args.side.partition(":")
    precision, *extras = rest.split("+")
    bf16, ckpt, compiled = precision == "bf16", "ckpt" in extras, "compile" in extras
    if compiled and who != "ours":
        raise SystemExit("+compile is ours only ([train] compile)")
    rss_imports = rss_gib()
    import transformers  # noqa: F401  (both sides pay for it, so the baselines are alike)

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    if args.task == "dpo":
        pair = [token_batch(args.batch, args.seq, vocab, args.seq // 4, seed) for seed in (1, 2)]
        data = {f"{side}_{k}": v for side, d in zip(("chosen", "rejected"), pair) for k, v in d.items()}
    elif args.task == "ppo":
        data = ppo_inputs(args.batch, args.seq, vocab)
    else:
        data = token_batch(args.batch, args.seq, vocab, args.seq // 4, seed=1)
    rss_start = rss_gib()
    if who == "ours":
        step_loss, params = ours_step(args.task, args.model, data, ckpt, compiled)
    else:
        step_loss, params = hf_step(args.task, args.model, data, ckpt, bf16)
    optimizer = None
    if params is not None:
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-6, fused=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    rss_loaded = rss_gib()

    def step() -> float:
        if optimizer is None:  # TRL's trainer runs its own autocast, backward and optimizer
            return float(step_loss().detach())
        with autocast():
            loss = step_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses, cpu, wall = [], [], []
    for _ in range(args.steps + 1):  # the first step is the warm-up (optimizer states, oneDNN, compiling)
        c0, w0 = time.process_time(), time.perf_counter()
        losses.append(step())
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    warmup_wall, cpu, wall = wall[0], cpu[1:], wall[1:]
    print(json.dumps({"task": args.task, "side": args.side, "first_loss": losses[0], "cpu": cpu, "wall": wall,
                      "warmup_wall": warmup_wall,
                      "rss_imports": rss_imports, "rss_start": rss_start, "rss_loaded": rss_loaded,
                      "peak_rss": rss_gib(), "shape": getattr(step_loss, "shape", None)}))


if __name__ == "__main__":
    main()
