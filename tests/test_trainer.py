"""The shared training loop: schedule, exact resume, atomic checkpoints, NaN and Ctrl-C handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minirlhf.config import load_config
from minirlhf.errors import TrainingError
from minirlhf.optimization import lr_factor
from minirlhf.run_dir import OutputDirError, checkpoint_dirs
from minirlhf.stages import sft
from minirlhf.tokenizer_training import train_sentencepiece
from minirlhf.trainer import Trainer, has_diverged

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SentencePiece tokenizer and a tiny alpaca dataset, shared by the tests here."""
    root = tmp_path_factory.mktemp("trainer")
    g = torch.Generator().manual_seed(0)
    texts, rows = [], []
    for _ in range(64):
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


def test_full_disk_mid_save_keeps_previous_checkpoint(workspace, tmp_path, monkeypatch):
    """A write that fails (here: no space left while the step-4 state is written) stops the run with one line
    naming the file and the last good checkpoint; that checkpoint is intact, the half-written one gone."""
    import errno

    from minirlhf import checkpointing

    cfg = make_config(workspace, tmp_path / "c", "train.save_every=2", "train.max_steps=4")
    trainer = Trainer(cfg, sft.build_stage(cfg))
    real_save = checkpointing.save_tree

    def full_disk(tree, folder, name):
        if name == "state" and tree.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "state.json"))
        return real_save(tree, folder, name)

    monkeypatch.setattr(checkpointing, "save_tree", full_disk)
    with pytest.raises(OutputDirError) as info:
        trainer.fit()
    assert str(info.value) == (f"cannot write {tmp_path / 'c/checkpoints/.tmp-step-0000004/state.json'}: No space "
                               f"left on device; the last good checkpoint is {tmp_path / 'c/checkpoints/step-0000002'}")
    found = checkpoint_dirs(tmp_path / "c")
    assert [p.name for p in found] == ["step-0000002"]
    assert {p.name for p in found[0].iterdir()} >= {"state.json", "optimizer.json", "trainable.safetensors"}
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "c" / "checkpoints").iterdir())


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


# ------------------------------------------------------------------------------ gradient accumulation


def test_grad_accum_weights_every_trained_token_equally(workspace, tmp_path):
    """grad_accum 2 x micro-batch 2 gives the gradient of one batch of 4: the mean over all trained tokens,
    not the mean of the two micro-batches' means. The first two rows have 1-word answers, the next two
    30-word ones, so the micro-batch means weigh their tokens very differently (the old
    `loss / grad_accum` was off by tens of percent here). Float32 sums in another order: 1e-6."""
    rows = [{"instruction": "say", "input": "", "output": " ".join(WORDS[:n])} for n in (1, 1, 30, 30)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    grads = {}
    for name, sets in {"accum": ["train.micro_batch_size=2", "train.grad_accum=2"],
                       "whole": ["train.micro_batch_size=4", "train.grad_accum=1"]}.items():
        cfg = make_config(workspace, tmp_path / name, *sets, f'data.train_files=["{data}"]', "data.shuffle=false",
                          "train.max_steps=1", "train.max_grad_norm=0", "data.cutoff_len=64")
        stage = sft.build_stage(cfg)
        if name == "accum":
            start = stage.batches.state_dict()
            counts = [stage.loss_tokens(next(stage.batches)) for _ in range(2)]
            stage.batches.load_state_dict(start)
            assert counts[1] > 4 * counts[0], counts  # the micro-batches really are unequal
        trainer = Trainer(cfg, stage)
        real_step = trainer.optimizer_step

        def capture(*a, _real=real_step, _name=name, _model=stage.model, **k):
            grads[_name] = {n: p.grad.clone() for n, p in _model.named_parameters()}
            return _real(*a, **k)

        trainer.optimizer_step = capture
        trainer.fit()
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["accum"][n], g, rtol=1e-6, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------ interrupts


class SimulatedCtrlC:
    """Ctrl-C at one point of step 3 of a run (eval_every = 1, save_every = 3): in the middle of its forward
    passes, right after its weight update (a real SIGINT, as a user's), while its metrics are written,
    during its evaluation, or during its checkpoint."""

    def __init__(self, where: str, monkeypatch, stage, trainer):
        from minirlhf import checkpointing

        self.where, self.count = where, 0
        if where == "loss":
            real_loss = type(stage).loss
            monkeypatch.setattr(type(stage), "loss", lambda s, b: self.hit(6) or real_loss(s, b))
        elif where == "optimizer":
            real = trainer.optimizer.step
            trainer.optimizer.step = lambda *a, **k: (real(*a, **k), self.hit(3, signal_=True))[0]
        elif where == "log":
            real_log = trainer.log
            trainer.log = lambda row: (real_log(row), "loss" in row and self.hit(3))
        elif where == "eval":
            real_eval = type(stage).evaluate
            monkeypatch.setattr(type(stage), "evaluate", lambda s, t: self.hit(3) or real_eval(s, t))
        elif where == "save":
            real_fsync = checkpointing.fsync_files
            monkeypatch.setattr(checkpointing, "fsync_files", lambda files: self.hit(1) or real_fsync(files))

    def hit(self, n: int, signal_: bool = False) -> None:
        import os
        import signal

        self.count += 1
        if self.count == n:
            if signal_:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["loss", "optimizer", "log", "eval", "save"])
def test_ctrl_c_at_any_point_resumes_exactly(workspace, tmp_path, monkeypatch, where):
    """Interrupted then resumed, the run's losses are the uninterrupted run's: the checkpoint written on
    Ctrl-C holds weights, step, data position and RNG of the same step boundary (before step 3 when the
    interrupt came before its update, after it otherwise). Before this was fixed, an interrupt after the
    update saved the new weights with the old data position and trained one batch twice."""
    sets = ["train.eval_every=1", "train.save_every=3", "data.eval_split=0.1", "lora.enabled=true",
            "lora.dropout=0.1"]  # dropout: the RNG state must be exact too
    straight = make_config(workspace, tmp_path / "straight", *sets)
    Trainer(straight, sft.build_stage(straight)).fit()

    cfg = make_config(workspace, tmp_path / "cut", *sets)
    stage = sft.build_stage(cfg)
    trainer = Trainer(cfg, stage)
    with monkeypatch.context() as m:
        SimulatedCtrlC(where, m, stage, trainer)
        summary = trainer.fit()
    assert summary["status"] == "interrupted"
    assert summary["step"] == (2 if where == "loss" else 3)
    resumed = make_config(workspace, tmp_path / "cut", *sets, 'train.resume="auto"')
    Trainer(resumed, sft.build_stage(resumed)).fit()
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-7)


def test_torn_metrics_line_is_dropped_on_resume(workspace, tmp_path, monkeypatch):
    cfg = make_config(workspace, tmp_path / "t", "train.save_every=3")
    stage = sft.build_stage(cfg)
    real_step = type(stage).train_step
    monkeypatch.setattr(type(stage), "train_step",
                        lambda s, t: (_ for _ in ()).throw(RuntimeError("killed")) if t.step == 4 else real_step(s, t))
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, stage).fit()
    monkeypatch.undo()
    with open(tmp_path / "t" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # a line cut off by kill -9
    resumed = make_config(workspace, tmp_path / "t", "train.save_every=3", 'train.resume="auto"')
    assert Trainer(resumed, sft.build_stage(resumed)).fit()["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------ checkpoint contents


def test_checkpoints_hold_no_pickle(workspace, tmp_path):
    cfg = make_config(workspace, tmp_path / "j", "train.save_every=3")
    Trainer(cfg, sft.build_stage(cfg)).fit()
    for ckpt in checkpoint_dirs(tmp_path / "j"):
        assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors"}, list(ckpt.iterdir())
        state = json.loads((ckpt / "state.json").read_text())
        assert state["stage"] == "sft" and state["step"] == int(ckpt.name[5:]) and state["format"] == 2


class Exploit:
    """A pickle whose loading creates a file: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_state_is_refused_without_running_it(workspace, tmp_path):
    """An old-format or crafted checkpoint (state.pt, a pickle; DCP's pickled .metadata) is refused with one
    line, and nothing in it runs."""
    import pickle

    cfg = make_config(workspace, tmp_path / "k", "train.save_every=3")
    Trainer(cfg, sft.build_stage(cfg)).fit()
    ckpt = checkpoint_dirs(tmp_path / "k")[-1]
    marker = tmp_path / "pwned"
    for name in ("state.json", "optimizer.json", "optimizer.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": 3, "x": Exploit(marker)}))
    resumed = make_config(workspace, tmp_path / "k", 'train.resume="auto"')
    with pytest.raises(TrainingError, match=r"state.pt, a pickle\), which is not read"):
        Trainer(resumed, sft.build_stage(resumed)).fit()
    assert not marker.exists()

    # the sharded layout: a valid state.json, and a DCP .metadata that is an exploit
    Trainer(cfg, sft.build_stage(cfg))  # (nothing written: fit is not called)
    state = {"format": 2, "stage": "sft", "step": 3, "scheduler_steps": 3, "data": {}, "stage_state": {},
             "trainable": sorted(n for n, p in sft.build_stage(cfg).model.named_parameters())}
    (ckpt / "state.json").write_text(json.dumps(state))
    (ckpt / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(TrainingError, match="sharded checkpoint does not fit this run"):
        Trainer(resumed, sft.build_stage(resumed)).fit()
    assert not marker.exists()


def test_resume_with_a_new_lr_trains_at_the_new_lr(workspace, tmp_path):
    """The config given on resume is the one that runs (and the one config.toml holds): the optimizer keeps
    its moments from the checkpoint, its lr comes from the new config and the schedule's position."""
    from minirlhf.config import load_config as load

    sets = ["train.save_every=2", "train.max_steps=4", 'train.schedule="constant"', "train.warmup_steps=0"]
    cfg = make_config(workspace, tmp_path / "l", *sets)
    Trainer(cfg, sft.build_stage(cfg)).fit()
    ckpt = tmp_path / "l" / "checkpoints" / "step-0000002"
    resumed = make_config(workspace, tmp_path / "l", *sets, f'train.resume="{ckpt}"', "train.lr=1e-3")
    Trainer(resumed, sft.build_stage(resumed)).fit()
    rows = [json.loads(line) for line in (tmp_path / "l" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learning_rate"]) for r in rows if "loss" in r] == [(1, 3e-3), (2, 3e-3), (3, 1e-3),
                                                                              (4, 1e-3)]
    assert load(tmp_path / "l" / "config.toml").train.lr == 1e-3


def test_learning_rate_and_step_time_are_logged(workspace, tmp_path):
    cfg = make_config(workspace, tmp_path / "m", "train.max_steps=2")
    Trainer(cfg, sft.build_stage(cfg)).fit()
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert all("learning_rate" in r and r["time/step"] > 0 and "lr" not in r for r in rows)
    # warmup 2: the lr after step 1 is the second warmup step's, lr * 2/2 (reported after the update, as TRL)
    assert rows[0]["learning_rate"] == pytest.approx(3e-3)


# ------------------------------------------------------------------------------ divergence


def test_has_diverged_rules():
    chance = math.log(300)  # 5.70
    fresh_and_slow = [5.72, 5.71, 5.71, 5.70, 5.70]  # a fresh model learning slowly: never below 0.9 chance
    assert not has_diverged(fresh_and_slow, chance)
    assert has_diverged([2.0, 1.5, 5.70, 5.71, 5.70], chance)  # learned, then back to a uniform guess
    assert not has_diverged([2.0, 1.5, 5.70, 5.71, 3.0], chance)  # only two at chance in a row
    assert has_diverged([5.7, 15.5, 30.8, 27.9], chance)  # far past chance from the start
    assert not has_diverged([5.7, 15.5, 30.8, 5.6], chance)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_diverging_run_stops_with_a_clear_error(workspace, tmp_path, seed):
    """lr = 1 on the tiny model: the loss leaves ln V = 5.70 for 13-33 within two steps (measured, the same on 1
    and 2 threads: seed 0 5.75 14.3 21.3 32.6; seed 1 5.76 7.8 25.2 32.5 19.8; seed 2 5.72 9.3 13.5 17.9 22.2),
    so three logged losses past 2 ln V = 11.4 stop it at step 4 or 5 (6 allowed for other CPUs)."""
    cfg = make_config(workspace, tmp_path / "n", "train.lr=1.0", "train.max_steps=20", "train.warmup_steps=0",
                      f"train.seed={seed}", "train.max_grad_norm=0")
    with pytest.raises(TrainingError, match=r"training diverged at step [4-6]: the last 3 logged losses .* at or past "
                                            r"5\.704"):
        Trainer(cfg, sft.build_stage(cfg)).fit()


def test_deferred_interrupt_holds_ctrl_c_until_release_and_leaves_an_ignored_sigint_alone():
    import os
    import signal

    from minirlhf.trainer import DeferredInterrupt

    guard = DeferredInterrupt()
    guard.hold()  # not enabled (outside Trainer.fit): nothing changes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    guard.enabled = True
    guard.hold()
    os.kill(os.getpid(), signal.SIGINT)  # held: nothing raised here
    with pytest.raises(KeyboardInterrupt):
        guard.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not guard.torn

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a shell script
    try:
        guard.hold()
        os.kill(os.getpid(), signal.SIGINT)
        guard.release()  # ignored before, ignored still: no KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------ [train] compile


def test_compile_trains_the_same_run_through_compiled_blocks(workspace, tmp_path):
    """[train] compile = true: the blocks run through torch.compile (dynamo counts frames it compiled) and
    the run's losses are the eager run's to float32 rounding (inductor reorders the sums)."""
    from torch._dynamo.utils import counters

    eager = make_config(workspace, tmp_path / "eager", "train.max_steps=3")
    Trainer(eager, sft.build_stage(eager)).fit()
    torch._dynamo.reset()
    counters.clear()
    compiled = make_config(workspace, tmp_path / "compiled", "train.max_steps=3", "train.compile=true")
    Trainer(compiled, sft.build_stage(compiled)).fit()
    assert counters["stats"]["unique_graphs"] >= 1
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
