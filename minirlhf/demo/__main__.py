"""`make demo`: the whole pipeline on the bundled demo task, on CPU, in minutes.

    data + tokenizer -> pt (fresh tiny llama) -> sft -> rm -> dpo, kto, ppo; grpo (the gold judge as its reward)

Each stage is the real CLI (`minirlhf train --stage S --config configs/demo/S.toml`); at the end the gold
score of every policy (`minirlhf eval` with the gold judge as its reward function, see evaluate.py) is
printed side by side with its KL from the sft policy, and the training curves of all stages are drawn
into runs/demo/curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "demo"
OUT = REPO / "runs" / "demo"  # the demo configs point here
POLICY_STAGES = ("pt", "sft", "dpo", "kto", "ppo", "grpo")  # stages whose output is a policy to score
PIPELINE = ("pt", "sft", "rm", "dpo", "kto", "ppo", "grpo")


def prepare(vocab_size: int = 1024) -> None:
    """Generate the task's data files and train its SentencePiece tokenizer (once)."""
    from minirlhf.demo.data import generate_demo_data, tokenizer_corpus
    from minirlhf.tokenizer_training import train_sentencepiece

    if not (OUT / "data" / "eval_prompts.jsonl").exists():
        generate_demo_data(OUT / "data")
    if not (OUT / "tokenizer" / "tokenizer_config.json").exists():
        train_sentencepiece(tokenizer_corpus(), str(OUT / "tokenizer"), vocab_size=vocab_size)


def run_stage(stage: str, extra: list[str]) -> float:
    from minirlhf.commands import train

    start = time.time()
    args = ["--stage", stage, "--config", str(CONFIGS / f"{stage}.toml"), "--overwrite"]  # a rerun starts afresh
    for item in extra:
        args += ["--set", item]
    if train.main(args) != 0:
        raise SystemExit(f"demo: stage {stage} failed (see the error above)")
    return time.time() - start


def combined_curves(stages: list[str]) -> Path | None:
    """One PNG with each stage's main curves, one row per stage."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wanted = {"pt": ["loss", "eval/loss"], "sft": ["loss", "eval/loss"], "rm": ["loss", "eval/accuracy"],
              "dpo": ["loss", "rewards/margins"], "kto": ["loss", "rewards/margins"], "ppo": ["score/mean", "kl"],
              "grpo": ["reward", "completions/mean_length"]}
    fig, axes = plt.subplots(len(stages), 2, figsize=(9, 2.3 * len(stages)), squeeze=False)
    for row, stage in zip(axes, stages):
        path = OUT / stage / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        for ax, key in zip(row, wanted[stage]):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if not points:
                ax.axis("off")
                continue
            ax.plot(*zip(*points))
            ax.set_title(f"{stage}: {key}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    png = OUT / "curves.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(PIPELINE), help="comma-separated subset, in pipeline order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts used for the gold score")
    args = p.parse_args(argv)
    stages = [s for s in PIPELINE if s in args.stages.split(",")]

    from minirlhf.demo.evaluate import evaluate_dir

    prepare()
    times = {s: run_stage(s, args.set) for s in stages}
    print("\n== demo: gold score of each policy on held-out prompts (sampled at temperature 1)")
    print(f"{'policy':8} {'gold':>8} {'KL from sft':>12} {'length':>8} {'train s':>8}")
    sft_dir = OUT / "sft" if (OUT / "sft" / "config.json").exists() else None
    for stage in POLICY_STAGES:
        if stage not in stages and not (OUT / stage / "config.json").exists():
            continue
        report = evaluate_dir(OUT / stage, OUT / "tokenizer", OUT / "data" / "eval_prompts.jsonl",
                              ref_dir=sft_dir if stage != "pt" else None, limit=args.eval_prompts)
        kl = "-" if report.kl_from_ref is None else f"{report.kl_from_ref:.3f}"
        took = f"{times[stage]:.0f}" if stage in times else "-"
        print(f"{stage:8} {report.gold:8.3f} {kl:>12} {report.mean_length:8.1f} {took:>8}")
        for prompt, answer in report.samples[:1]:
            print(f"         e.g. {prompt!r} -> {answer!r}")
    png = combined_curves([s for s in PIPELINE if (OUT / s / "metrics.jsonl").exists()])
    if png:
        print(f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
