"""The shared training loop: schedule, exact resume, atomic checkpoints, NaN and Ctrl-C handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minirlhf import sft
from minirlhf.config import load_config
from minirlhf.tokenizer import train_sentencepiece
from minirlhf.trainer import Trainer, TrainingError, checkpoint_dirs, lr_factor

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SentencePiece tokenizer and a tiny alpaca dataset, shared by the tests here."""
    root = tmp_path_factory.mktemp("trainer")
    g = torch.Generator().manual_seed(0)
    texts, rows = [], []
    for i in range(64):
        idx = torch.randint(len(WORDS), (8,), generator=g).tolist()
        answer = " ".join(WORDS[j] for j in idx)
        rows.append({"instruction": f"say {WORDS[idx[0]]}", "input": "", "output": answer})
        texts.append(answer)
    train_sentencepiece(texts * 4, str(root / "tok"), vocab_size=300)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_config(workspace, out, *extra):
    (workspace / "cfg.toml").write_text(f"""
[model]
tokenizer = "{workspace / 'tok'}"
[model.init]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
train_files = ["{workspace / 'sft.jsonl'}"]
cutoff_len = 48
[train]
output_dir = "{out}"
lr = 3e-3
max_steps = 6
warmup_steps = 2
micro_batch_size = 4
grad_accum = 2
log_every = 1
""")
    return load_config(workspace / "cfg.toml", list(extra), stage="sft")


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_lr_schedule_known_values():
    # warmup 2 of 10 steps: 1/2, 2/2; cosine to 0.1 afterwards: at step 6, progress 4/8 = 0.5,
    # factor = 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_factor(0, 2, 10, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 2, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, "linear", 0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(6, 2, 10, "constant", 0.1) == 1.0


def test_sft_run_writes_model_metrics_and_curves(workspace, tmp_path):
    cfg = make_config(workspace, tmp_path / "run")
    summary = Trainer(cfg, sft.build_stage(cfg)).fit()
    assert summary == {"status": "completed", "step": 6, "output_dir": str(tmp_path / "run")}
    for name in ("config.json", "model.safetensors", "tokenizer.model", "config.toml", "curves.png"):
        assert (tmp_path / "run" / name).exists(), name
    got = losses(tmp_path / "run")
    assert len(got) == 6 and got[-1] < got[0]


def test_resume_matches_uninterrupted_run(workspace, tmp_path, monkeypatch):
    straight = make_config(workspace, tmp_path / "a", "train.save_every=3")
    Trainer(straight, sft.build_stage(straight)).fit()

    cfg = make_config(workspace, tmp_path / "b", "train.save_every=3")
    stage = sft.build_stage(cfg)
    real_step = type(stage).train_step
    calls = {"n": 0}

    def crash_after_four(self, trainer):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_step(self, trainer)

    monkeypatch.setattr(type(stage), "train_step", crash_after_four)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, stage).fit()
    monkeypatch.setattr(type(stage), "train_step", real_step)
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-0000003"]

    resumed = make_config(workspace, tmp_path / "b", "train.save_every=3", 'train.resume="auto"')
    Trainer(resumed, sft.build_stage(resumed)).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(b) == 6  # metrics after the checkpoint were cut back, then written again
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_crash_mid_save_keeps_previous_checkpoint(workspace, tmp_path, monkeypatch):
    cfg = make_config(workspace, tmp_path / "c", "train.save_every=2", "train.max_steps=4")
    trainer = Trainer(cfg, sft.build_stage(cfg))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError("disk pulled out mid-save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        trainer.fit()
    found = checkpoint_dirs(tmp_path / "c")
    assert [p.name for p in found] == ["step-0000002"]
    assert (found[0] / "state.pt").exists() and (found[0] / "trainable.safetensors").exists()


def test_nan_loss_stops_with_last_checkpoint(workspace, tmp_path, monkeypatch):
    cfg = make_config(workspace, tmp_path / "d", "train.save_every=2")
    stage = sft.build_stage(cfg)
    real_loss = type(stage).loss
    seen = {"n": 0}

    def poisoned(self, batch):
        seen["n"] += 1
        loss, metrics = real_loss(self, batch)
        return (loss * math.nan if seen["n"] > 6 else loss), metrics  # step 4's first micro-batch

    monkeypatch.setattr(type(stage), "loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 4.*step-0000002"):
        Trainer(cfg, stage).fit()


def test_ctrl_c_saves_and_resumes_exactly(workspace, tmp_path, monkeypatch):
    straight = make_config(workspace, tmp_path / "e0")
    Trainer(straight, sft.build_stage(straight)).fit()

    cfg = make_config(workspace, tmp_path / "e")
    stage = sft.build_stage(cfg)
    real_loss = type(stage).loss
    seen = {"n": 0}

    def interrupted(self, batch):
        seen["n"] += 1
        if seen["n"] == 6:  # in the middle of step 3 (its second micro-batch)
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(type(stage), "loss", interrupted)
    summary = Trainer(cfg, stage).fit()
    assert summary["status"] == "interrupted" and summary["step"] == 2
    monkeypatch.setattr(type(stage), "loss", real_loss)
    resumed = make_config(workspace, tmp_path / "e", 'train.resume="auto"')
    Trainer(resumed, sft.build_stage(resumed)).fit()
    assert losses(tmp_path / "e") == pytest.approx(losses(tmp_path / "e0"), rel=1e-5, abs=1e-6)


def test_checkpoint_for_other_parameters_is_refused(workspace, tmp_path):
    cfg = make_config(workspace, tmp_path / "f", "train.save_every=2", "train.max_steps=2")
    Trainer(cfg, sft.build_stage(cfg)).fit()
    ckpt = checkpoint_dirs(tmp_path / "f")[-1]
    lora = make_config(workspace, tmp_path / "g", f'train.resume="{ckpt}"', "lora.enabled=true")
    with pytest.raises(TrainingError, match="does not fit this run's trainable parameters"):
        Trainer(lora, sft.build_stage(lora)).fit()
