"""Peak memory of the online RL stages (ppo, grpo) on a real checkpoint with LoRA, against their weight bytes.

Each case runs in a fresh process: the stage is built from a Config as `minirlhf train` builds it
(commands/train.build_trainer), then `--steps` trainer steps run (each one rollout: generation, the
measuring forwards, rewards, and its update). The process reads /proc/self/status (benchmarks/
load_memory.py's proc_status): VmRSS after the imports (the baseline), after the build, and the high-water
mark VmHWM at the end. Weight bytes are counted from the built models: every parameter and buffer
reachable from the stage's models (policy, reference, critic, reward model), each storage once, split into
the frozen base weights and the trainable ones. A reference that is the policy with its adapters off adds
no storage; a frozen copy adds one base.

    grpo        LoRA policy, beta = 0: no reference at all
    grpo-kl     LoRA policy, beta = 0.04: the reference is the policy with its adapters off (one base)
    grpo-full-kl  full fine-tuning, beta = 0.04: the reference is a frozen copy (two bases; for contrast)
    ppo         LoRA policy + reference (adapters off) + critic (the reward model's base with its own
                adapter and a value head) + the frozen reward model: three bases
    ...:nofuse  the same with generation on the modules' own weights (generation.worth_fusing off): the
                fused, LoRA-folded copy that generation builds for speed is one more base while it runs
    ...:ckpt    the same with [train] activation_checkpointing = true
    ...:compile the same with [train] compile = true (its first step compiles; the peak is over all of it)

Most of a LoRA case's peak above its weights is the update's activations: an eager fp32 forward of the
30-layer model keeps ~2 GiB for one micro-batch of 16 answers x 62 tokens, and every adapted linear adds its
branch's outputs (B A x, its scaled copy, the sum) on top; :ckpt and :compile are the two remedies measured.

Rollouts: 4 prompts x 8 answers (grpo) or 32 prompts x 1 (ppo), <= 16 new tokens, the arithmetic task of
minirlhf/tasks/arithmetic.py, fp32. ppo's reward model is the real checkpoint with a fresh value head,
saved once into a temporary directory (it is the critic's start too).

    python benchmarks/rl_memory.py [--cases grpo grpo-kl ppo ...] [--steps 1] [--threads 2] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from load_memory import proc_status
from results import REAL_MODEL, RESULTS, ROOT, append_rows, cpu_device, require_model, run_json, today, versions

sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "examples" / "smollm2_grpo_arith.toml"
CASES = ("grpo", "grpo-kl", "grpo-full-kl", "ppo", "grpo-kl:nofuse", "ppo:nofuse", "grpo:ckpt", "grpo:compile",
         "ppo:ckpt", "ppo:compile")
DEFAULT_CASES = ("grpo", "grpo-kl", "grpo-kl:nofuse", "grpo-full-kl", "ppo", "ppo:nofuse")
GiB = 2**30


def overrides(case: str, data: str, rm: str, out: str, threads: int) -> tuple[str, list[str]]:
    """(stage, --set overrides) of a case, on top of the grpo recipe (ppo reads only the shared sections)."""
    stage = case.partition(":")[0].split("-")[0]
    common = [f"model.path={REAL_MODEL}", f"data.train_files=[\"{Path(data) / 'train.jsonl'}\"]",
              "data.eval_files=[]", "data.eval_split=0.0", f"train.output_dir={out}", "train.overwrite=true",
              "train.max_steps=10", f"train.threads={threads}", "train.precision=\"fp32\"",
              f"lora.enabled={'false' if 'full' in case else 'true'}", "lora.target_modules=\"all-linear\"",
              f"train.activation_checkpointing={'true' if case.endswith(':ckpt') else 'false'}",
              f"train.compile={'true' if case.endswith(':compile') else 'false'}"]
    if stage == "grpo":
        beta = "0.04" if "kl" in case else "0.0"
        return stage, common + [f"grpo.beta={beta}", "grpo.reward_functions=[\"minirlhf.rewards:number_match\"]",
                                "grpo.reward_weights=[]", "grpo.reward_kwargs={}", "grpo.log_samples_every=0"]
    return stage, common + [f"ppo.reward_model={rm}", "ppo.prompts_per_rollout=32", "ppo.samples_per_prompt=1",
                            "ppo.minibatch_size=16", "ppo.micro_batch_size=16", "ppo.max_new_tokens=16",
                            "ppo.log_samples_every=0", "ppo.estimator=\"gae\""]


def stage_models(stage) -> dict:
    """The models a built stage holds, by role (a role the stage lacks is left out)."""
    reference = getattr(stage, "reference", None)
    scorer = getattr(stage, "scorer", None) or getattr(stage, "score_fn", None)
    found = {"policy": getattr(stage, "policy", None) or stage.model, "critic": getattr(stage, "critic", None),
             "reference": reference.model if reference is not None else None,
             "reward model": getattr(scorer, "reward_model", None)}
    return {k: v for k, v in found.items() if v is not None}


def weight_bytes(models: dict) -> dict:
    """Bytes of the distinct storages of every parameter and buffer: frozen, trainable, and per role (a role
    counts only storages no earlier role holds, so a shared base is counted once, for the first)."""
    import torch

    seen: set[int] = set()
    out = {"frozen": 0, "trainable": 0, "roles": {}}
    for role, model in models.items():
        own = 0
        for t in [*model.parameters(), *model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.device == torch.device("meta"):
                continue
            seen.add(ptr)
            n = t.untyped_storage().nbytes()
            own += n
            out["trainable" if t.requires_grad else "frozen"] += n
        out["roles"][role] = own
    return out


def child(case: str, data: str, rm: str, threads: int, steps: int) -> None:
    """In a fresh process: build the case's stage, run `steps` trainer steps, print the figures as JSON."""
    import torch

    torch.set_num_threads(threads)
    from minirlhf import generation
    from minirlhf.commands.train import build_trainer
    from minirlhf.config import load_config

    if case.endswith(":nofuse"):
        generation.worth_fusing = lambda model, batch: False
    before = proc_status()
    with tempfile.TemporaryDirectory(prefix="minirlhf_rl_memory_") as out:
        stage_name, sets = overrides(case, data, rm, out, threads)
        trainer = build_trainer(load_config(RECIPE if stage_name == "grpo" else None, sets, stage=stage_name), "cpu")
        built = proc_status()
        models = stage_models(trainer.stage)
        weights = weight_bytes(models)
        base = sum(p.untyped_storage().nbytes() for n, p in models["policy"].named_parameters()
                   if not p.requires_grad or "lora" not in n)
        reference = getattr(trainer.stage, "reference", None)
        shares = reference is not None and reference.model is models["policy"]
        trainer.stage.model.train()
        try:
            for _ in range(steps):
                trainer.stage.train_step(trainer)
                trainer.scheduler.step()
                trainer.step += 1
        finally:
            trainer.run_dir.release()
        end = proc_status()
    print(json.dumps({"case": case, "rss_imports": before["VmRSS"], "rss_built": built["VmRSS"],
                      "peak": end["VmHWM"], "weights": weights, "policy_base": base,
                      "reference_is_policy": shares}))


def make_reward_model(directory: Path) -> None:
    """The real checkpoint with a fresh value head, saved as a reward model (ppo's reward model and critic)."""
    from minirlhf.heads import RewardModel
    from minirlhf.tokenizer import load_tokenizer

    RewardModel.from_pretrained(str(REAL_MODEL), seed=0, new_head=True).save_pretrained(
        directory, tokenizer=load_tokenizer(str(REAL_MODEL)))


def run_case(case: str, data: str, rm: str, args) -> dict:
    return run_json([sys.executable, __file__, "--child", case, "--data", data, "--rm", rm, "--threads",
                     str(args.threads), "--steps", str(args.steps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=1, help="trainer steps (rollout + update) per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.rm, args.threads, args.steps)
        return
    require_model(REAL_MODEL)
    from minirlhf.tasks.arithmetic import make_arithmetic_data

    rows = []
    device = cpu_device(args.threads)
    print(f"{versions('torch', 'python')}; {device}")
    with tempfile.TemporaryDirectory(prefix="minirlhf_rl_memory_data_") as tmp:
        make_arithmetic_data(tmp, n_train=200, n_eval=0, seed=0)
        if any(c.startswith("ppo") for c in args.cases):
            make_reward_model(Path(tmp) / "rm")
        for case in args.cases:
            r = run_case(case, tmp, str(Path(tmp) / "rm"), args)
            base, w = r["policy_base"], r["weights"]
            extra = r["peak"] - r["rss_imports"]
            roles = ", ".join(f"{k} {v / GiB:.2f}" for k, v in w["roles"].items())
            print(f"\n{case}: weights held {(w['frozen'] + w['trainable']) / GiB:.2f} GiB = "
                  f"{(w['frozen'] + w['trainable']) / base:.2f} policy bases ({roles} GiB; trainable "
                  f"{w['trainable'] / GiB:.3f}); reference is the policy: {r['reference_is_policy']}\n"
                  f"  RSS after imports {r['rss_imports'] / GiB:.2f}, built {r['rss_built'] / GiB:.2f}, peak "
                  f"{r['peak'] / GiB:.2f} GiB; peak - imports = {extra / GiB:.2f} GiB = {extra / base:.2f} "
                  f"policy bases")
            rows.append([today(), f"peak RSS of {case} (LoRA{' off' if 'full' in case else ''}, one rollout + update), "
                         f"against weight bytes; weights held {(w['frozen'] + w['trainable']) / base:.2f} bases "
                         f"({roles} GiB); reference is the policy: {r['reference_is_policy']}",
                         "SmolLM2-135M fp32, 32 answers, <= 16 new tokens", "-", "-",
                         f"{extra / base:.2f} bases",
                         f"peak {r['peak'] / GiB:.2f} GiB (imports {r['rss_imports'] / GiB:.2f}, built "
                         f"{r['rss_built'] / GiB:.2f}); base {base / GiB:.2f} GiB", device,
                         versions("torch", "python")])
    if not args.no_append:
        append_rows(rows)
        print(f"\nappended {len(rows)} row(s) to {RESULTS}")


if __name__ == "__main__":
    main()
