"""One GRPO iteration (generation + update) on a real checkpoint: minirlhf's grpo stage against TRL's
GRPOTrainer (TRL 1.16; it replaces a PPO comparison, TRL no longer shipping PPOTrainer).

Both sides train the same model on the same task, generated here (minirlhf/tasks/arithmetic.py: "What is
59 + 63? Answer with just the number."), with the same settings, taken from one Config:
configs/examples/smollm2_grpo_arith.toml with this script's overrides. Per iteration: prompts x group
answers sampled at the recipe's temperature, up to max_new_tokens each, stopping at <|im_end|>; rewards
from minirlhf.rewards:number_match; group advantages; one on-policy AdamW update (beta = 0: no reference
model, num_iterations = 1: no old log-prob forward on either side), micro_batch sequences per
forward/backward (TRL: per_device_train_batch_size = micro_batch, gradient_accumulation_steps =
rollout / micro_batch, one generation per optimizer step), the same loss_type, lr, clip range, gradient
clipping, AdamW betas, eps and weight decay, and activation checkpointing as the Config says (off in the
recipe; TRL's own default is on, which alone makes its update slower and its memory smaller). Full
fine-tuning, or LoRA with the recipe's [lora] (peft on TRL's side) with --lora.

Ours goes through the real stage: the Config is loaded as `minirlhf train` loads it, the stage and its
Trainer built by commands/train.build_trainer, and each iteration is one `stage.train_step(trainer)`.
TRL's is `GRPOTrainer.train()` with max_steps = warm-up + iterations, timed by a callback from the start to
the end of each optimizer step. Generation is what comes before the update: ours, the stage's
time/generate + time/logprobs + time/score; TRL's, its `_generate_and_score_completions` (sampling,
decoding, rewards, advantages). Update = iteration - generation. Answer lengths differ between the sides
(each samples its own answers); the mean generated tokens per answer is printed with each side.

Every side runs in a fresh process (this script with --worker) so that its peak RSS (getrusage ru_maxrss;
on CUDA torch.cuda.max_memory_allocated) is its own; the processes alternate, `--repeats` rounds, so a
change in the machine's load hits both alike. In each process `--warmup` iterations are discarded (oneDNN
primitives, optimizer state, TRL's lazy set-up) and `--iterations` timed; times are medians over all timed
iterations of a side: wall time (the torch threads are --threads) and process CPU time.

    python benchmarks/grpo_step.py [--prompts 4] [--group 8] [--max-new-tokens 16] [--micro-batch 16]
                                   [--iterations 2] [--warmup 1] [--repeats 2] [--threads 2] [--lora]
                                   [--precision fp32|bf16] [--device cpu|cuda] [--model DIR]

On a GPU (--device cuda, the default when one is visible) both sides run there in bf16 autocast. Appends
rows to benchmarks/RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import REAL_MODEL, RESULTS, ROOT, append_rows, cpu_device, require_model, run_json, today, versions
from step_worker import rss_gib

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "examples" / "smollm2_grpo_arith.toml"
VERSIONS = ("torch", "transformers", "peft", "trl", "python")
SIDES = ("ours", "trl")


def load_cfg(args):
    """The recipe's Config with this run's settings: what both sides train with."""
    from minirlhf.config import load_config

    out = Path(args.out_dir)
    overrides = [
        f"model.path={args.model}", f"data.train_files=[\"{Path(args.data) / 'train.jsonl'}\"]", "data.eval_files=[]",
        "data.eval_split=0.0", f"train.output_dir={out / 'run'}", "train.overwrite=true", "train.schedule=\"constant\"",
        "train.warmup_steps=0", f"train.max_steps={args.warmup + args.iterations}", f"train.threads={args.threads}",
        f"train.precision=\"{args.precision}\"", f"train.lr={args.lr}" if args.lr else None,
        f"grpo.prompts_per_rollout={args.prompts}", f"grpo.samples_per_prompt={args.group}",
        f"grpo.micro_batch_size={args.micro_batch}", "grpo.minibatch_size=0", "grpo.num_iterations=1",
        f"grpo.max_new_tokens={args.max_new_tokens}", "grpo.beta=0.0", f"grpo.loss_type=\"{args.loss_type}\"",
        "grpo.reward_functions=[\"minirlhf.rewards:number_match\"]", "grpo.reward_weights=[]", "grpo.reward_kwargs={}",
        "grpo.log_samples_every=0", "grpo.dynamic_sampling=false", f"lora.enabled={'true' if args.lora else 'false'}",
    ]
    return load_config(RECIPE, [o for o in overrides if o], stage="grpo")


# --------------------------------------------------------------------------------------------------
# one side, in its own process


def ours_iterations(args, device: str) -> list[dict]:
    """Build the grpo stage as `minirlhf train` does, then time warm-up + iterations trainer steps."""
    import torch

    from minirlhf.commands.train import build_trainer
    from minirlhf.stages.rollout import sync_time

    trainer = build_trainer(load_cfg(args), device)
    stage = trainer.stage
    stage.model.train()
    out = []
    try:
        for _ in range(args.warmup + args.iterations):
            c0, w0 = time.process_time(), time.perf_counter()
            result = stage.train_step(trainer)
            trainer.scheduler.step()
            trainer.step += 1
            wall = sync_time(torch.zeros((), device=device)) - w0
            m = result.metrics
            generation = m["time/generate"] + m["time/logprobs"] + m["time/score"]
            out.append({"wall": wall, "cpu": time.process_time() - c0, "generation": generation,
                        "update": wall - generation, "length": m["completions/mean_length"], "reward": m["reward"]})
    finally:
        trainer.run_dir.release()
    return out


def trl_iterations(args, device: str) -> list[dict]:
    """TRL's GRPOTrainer with the same Config's settings, timed per optimizer step by a callback."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from minirlhf.rewards import number_match

    cfg = load_cfg(args)
    t, g = cfg.train, cfg.grpo
    rows = [json.loads(line) for line in (Path(args.data) / "train.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                           "answer": r["answer"]} for r in rows])

    def number_match_reward(prompts, completions, answer, **_):  # TRL hands chat completions as messages
        return number_match(prompts, [c[-1]["content"] for c in completions], answer)

    rollout = g.prompts_per_rollout * g.samples_per_prompt
    config = GRPOConfig(
        output_dir=str(Path(args.out_dir) / "trl"), use_cpu=device == "cpu", bf16=t.precision == "bf16",
        per_device_train_batch_size=g.micro_batch_size, gradient_accumulation_steps=rollout // g.micro_batch_size,
        num_generations=g.samples_per_prompt, max_completion_length=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=g.top_k, beta=g.beta, loss_type=g.loss_type, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high or g.epsilon, scale_rewards=g.scale_rewards, num_iterations=g.num_iterations,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.adam_eps, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.activation_checkpointing,  # TRL's default is True; ours follows the Config
        max_steps=args.warmup + args.iterations, seed=t.seed, disable_dropout=True, report_to=[],
        logging_steps=10**6, save_strategy="no", dataloader_num_workers=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.rslora)
    trainer = GRPOTrainer(model=model, reward_funcs=[number_match_reward], args=config, train_dataset=dataset,
                          processing_class=transformers.AutoTokenizer.from_pretrained(args.model),
                          peft_config=peft_config)

    def sync() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    out: list[dict] = []
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        start = sync()
        batch = generate(inputs)
        out[-1]["generation"] += sync() - start
        out[-1]["tokens"] += float(batch["completion_mask"].sum())
        out[-1]["answers"] += batch["completion_mask"].shape[0]
        return batch

    trainer._generate_and_score_completions = timed_generate

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            out.append({"generation": 0.0, "tokens": 0.0, "answers": 0, "w0": sync(), "c0": time.process_time()})

        def on_step_end(self, *_, **__):
            step = out[-1]
            step["wall"], step["cpu"] = sync() - step.pop("w0"), time.process_time() - step.pop("c0")
            step["update"] = step["wall"] - step["generation"]
            step["length"] = step.pop("tokens") / max(step.pop("answers"), 1)

    trainer.add_callback(StepTimer())
    trainer.train()
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    with tempfile.TemporaryDirectory(prefix="minirlhf_grpo_step_") as tmp:
        args.out_dir = tmp
        rss_start = rss_gib()
        steps = (ours_iterations if args.worker == "ours" else trl_iterations)(args, device)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    print(json.dumps({"side": args.worker, "steps": steps[args.warmup:], "warmup": steps[:args.warmup],
                      "rss_start": rss_start, "peak_rss": rss_gib(), "gpu_peak": gpu_peak}))


# --------------------------------------------------------------------------------------------------
# the driver


def run_worker(side: str, args) -> dict:
    return run_json([sys.executable, __file__, "--worker", side, "--data", args.data] + args.passed)


def device_label(args) -> str:
    if args.device != "cpu":
        import torch

        return torch.cuda.get_device_name()
    return f"{cpu_device(args.threads)}; load average {load_average()}"


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def compare(args) -> list[list[str]]:
    from minirlhf.tasks.arithmetic import make_arithmetic_data

    with tempfile.TemporaryDirectory(prefix="minirlhf_grpo_data_") as data:
        make_arithmetic_data(data, n_train=2000, n_eval=0, seed=0)
        args.data = data
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        loads = [load_average()]
        for r in range(args.repeats):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                runs[side].append(run_worker(side, args))
                loads.append(load_average())
    B = args.prompts * args.group
    shape = (f"SmolLM2-135M {'LoRA' if args.lora else 'full'}, {args.prompts} prompts x G={args.group} = {B} answers, "
             f"<= {args.max_new_tokens} new tokens, micro-batch {args.micro_batch}, {args.precision}")
    print(f"\ngrpo iteration: {shape}; median over {args.repeats} processes x {args.iterations} iterations "
          f"(after {args.warmup} warm-up); load average during the runs {', '.join(loads)}")
    summary = {}
    for side, rs in runs.items():
        steps = [s for r in rs for s in r["steps"]]
        med = {k: statistics.median(s[k] for s in steps) for k in ("wall", "cpu", "generation", "update", "length")}
        mem = statistics.median(r["gpu_peak"] if r["gpu_peak"] is not None else r["peak_rss"] for r in rs)
        summary[side] = (med, mem)
        print(f"  {side:5s} {med['wall']:6.2f} s/iteration wall ({med['cpu']:6.2f} s CPU): generation "
              f"{med['generation']:6.2f} s, update {med['update']:6.2f} s; {med['length']:.1f} tokens/answer; "
              f"peak {'GPU memory' if args.device != 'cpu' else 'RSS'} {mem:.2f} GiB")
    (o, m_o), (h, m_h) = summary["ours"], summary["trl"]
    speed = h["wall"] / o["wall"]
    print(f"  ours vs TRL: {speed:.2f}x faster per iteration (generation {h['generation'] / o['generation']:.2f}x, "
          f"update {h['update'] / o['update']:.2f}x), {m_o / m_h:.2f}x the peak memory")
    memory = "GPU peak" if args.device != "cpu" else "peak RSS"
    return [[today(), f"grpo iteration (generate + update), ours (grpo stage) vs TRL GRPOTrainer; generation "
             f"{h['generation'] / o['generation']:.2f}x, update {h['update'] / o['update']:.2f}x; tokens/answer "
             f"{o['length']:.1f} vs {h['length']:.1f}", shape,
             f"wall {o['wall']:.2f} vs {h['wall']:.2f} s/it (gen {o['generation']:.2f} vs {h['generation']:.2f}, "
             f"update {o['update']:.2f} vs {h['update']:.2f}); cpu {o['cpu']:.2f} vs {h['cpu']:.2f}",
             f"{B / o['wall']:.1f} vs {B / h['wall']:.1f} answers/s", f"{speed:.2f}x",
             f"{memory} {m_o:.2f} vs {m_h:.2f} GiB = {m_o / m_h:.2f}x", device_label(args), versions(*VERSIONS)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REAL_MODEL)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    parser.add_argument("--group", type=int, default=8, help="answers per prompt, G")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--lr", type=float, default=0.0, help="0 = the recipe's")
    parser.add_argument("--lora", action="store_true", help="LoRA with the recipe's [lora] (peft on TRL's side)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: fp32 on CPU, bf16 (autocast) on CUDA")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per process")
    parser.add_argument("--warmup", type=int, default=1, help="discarded iterations per process, first")
    parser.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"grpo iteration on {args.device} skipped: no CUDA device (run it on a GPU, or with --device cpu)")
        return
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.worker:
        worker(args)
        return
    require_model(args.model)
    args.passed = [a for a in sys.argv[1:] if a != "--no-append"] + ["--device", args.device,
                                                                     "--precision", args.precision]
    print(f"{versions(*VERSIONS)}; {device_label(args)}")
    rows = compare(args)
    if not args.no_append:
        append_rows(rows)
        print(f"\nappended {len(rows)} row(s) to {RESULTS}")


if __name__ == "__main__":
    main()
