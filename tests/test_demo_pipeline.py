"""The demo's first two stages through the real CLI, shortened: sft must raise the gold score over pt.

This is the only proof that the whole pt -> sft path (data generation, tokenizer training, packing,
chat-template masking, the trainer, checkpoint export, generation, the judge) works together on the
bundled task, so it runs in `make test` although it takes about a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minirlhf.commands import train
from minirlhf.demo.data import generate_demo_data, tokenizer_corpus
from minirlhf.demo.evaluate import evaluate_dir
from minirlhf.tokenizer_training import train_sentencepiece

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.mark.slow
def test_demo_sft_raises_the_gold_score(tmp_path):
    data = generate_demo_data(tmp_path / "data", sizes={"pt": 1500, "sft": 2000})
    train_sentencepiece(tokenizer_corpus(), str(tmp_path / "tok"), vocab_size=1024)
    pt = ["--set", f"model.tokenizer={tmp_path / 'tok'}", "--set", f'data.train_files=["{data["pt"]}"]',
          "--set", f"train.output_dir={tmp_path / 'pt'}", "--set", "train.max_steps=120",
          "--set", "train.eval_every=0"]
    assert train.main(["--stage", "pt", "--config", str(CONFIGS / "pt.toml"), *pt]) == 0
    sft = ["--set", f"model.path={tmp_path / 'pt'}", "--set", f'data.train_files=["{data["sft"]}"]',
           "--set", f"train.output_dir={tmp_path / 'sft'}", "--set", "train.max_steps=400",
           "--set", "train.eval_every=0"]
    assert train.main(["--stage", "sft", "--config", str(CONFIGS / "sft.toml"), *sft]) == 0

    before = evaluate_dir(tmp_path / "pt", tmp_path / "tok", data["eval"], limit=200)
    after = evaluate_dir(tmp_path / "sft", tmp_path / "tok", data["eval"], limit=200, ref_dir=tmp_path / "sft")
    # Margins from the spread measured over seeds 42, 1, 2 x torch threads 1, 2 in training and in this
    # evaluation (6 pt -> sft runs, each scored with 1 and 2 threads):
    # - the shortened pt model writes fragments and runs past two sentences in 17-70% of its answers;
    #   sft's answers are in the task's form in 96-100% (the fraction of 200 answers has a standard error
    #   of ~0.015 there), so 0.85 leaves seven of them;
    # - sft's gold gain over pt was +0.08 .. +0.54 (bimodal: some runs also learn to name the topic); the
    #   gain of two 200-answer means has a standard error of ~0.03, so the bound is 2 below the smallest.
    # An earlier version asserted that sft answers are shorter: they are not (the pt model stops early
    # too), and that assertion failed on other CPUs.
    assert after.well_formed >= 0.85, (before.well_formed, after.well_formed)
    assert after.gold > before.gold + 0.02, (before.gold, after.gold)
    assert after.kl_from_ref == pytest.approx(0.0, abs=1e-4)  # a policy against itself
