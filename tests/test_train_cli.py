"""train.py and the run's output directory: what is refused (an output that is an input, an earlier run
without --overwrite, files minirlhf did not write, a directory another run holds, --resume with nothing
to resume, a device this machine lacks) and what is guaranteed (same config = same numbers with LoRA,
files with the usual permissions, info lines on stderr, [train] threads)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_tiny import answer, preference_rows, prompt, tiny_model_dir, tiny_tokenizer, write_jsonl

import train
from minirlhf.config import load_config
from minirlhf.run_dir import OutputDirError, claim_output_dir
from minirlhf.trainer import plot_metrics

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_s", "time/step"}  # the only metrics that may differ between identical runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer(root / "tok")
    model = tiny_model_dir(root / "model", tok)
    sft_rows = [{"instruction": prompt(i), "input": "", "output": answer(i, i % 2 == 0)} for i in range(16)]
    (root / "cfg.toml").write_text("[train]\nlr = 3e-3\nmicro_batch_size = 4\nlog_every = 1\nmax_steps = 2\n"
                                   'precision = "fp32"\n[data]\ncutoff_len = 64\n')
    return {"root": root, "model": model, "sft": write_jsonl(root / "sft.jsonl", sft_rows),
            "pref": write_jsonl(root / "pref.jsonl", preference_rows(16))}


def args_for(tiny, out: Path, *sets: str, stage: str = "sft", data: str = "sft") -> list[str]:
    args = ["--stage", stage, "--config", str(tiny["root"] / "cfg.toml"), "--set", f"model.path={tiny['model']}",
            "--set", f"data.train_files=[{json.dumps(str(tiny[data]))}]", "--set", f"train.output_dir={out}"]
    for s in sets:
        args += ["--set", s]
    return args


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """train.main's exit status and the last line it printed to stderr."""
    capsys.readouterr()
    status = train.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return status, err[-1] if err else ""


def numbers(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ------------------------------------------------------------------------------ output directories


def test_an_earlier_run_is_kept_unless_overwrite_and_unknown_files_never_deleted(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(args_for(tiny, out, "train.save_every=1"), capsys)[0] == 0
    first = (out / "model.safetensors").read_bytes()
    status, err = run_cli(args_for(tiny, out, "train.lr=1e-3"), capsys)
    assert status == 2
    assert err == (f"error: OutputDirError: [train] output_dir {out} holds an earlier sft run with checkpoints "
                   f"step-0000001 .. step-0000002: --resume continues it, --overwrite (or [train] overwrite = true) "
                   f"replaces it")
    assert (out / "model.safetensors").read_bytes() == first  # untouched

    assert run_cli(args_for(tiny, out, "train.lr=1e-3") + ["--overwrite"], capsys)[0] == 0
    assert not (out / "checkpoints").exists()  # the earlier run's checkpoints went too
    assert len(numbers(out)) == 2  # a fresh run's lines only
    assert numbers(out)[0]["learning_rate"] == pytest.approx(1e-3 * 0.55)  # cosine half-way to 0.1 x lr

    (out / "notes.txt").write_text("mine")
    status, err = run_cli(args_for(tiny, out) + ["--overwrite"], capsys)
    assert status == 2 and err == (f"error: OutputDirError: [train] output_dir {out} holds files no minirlhf run "
                                   f"recorded as its own (notes.txt); choose an empty output_dir")
    assert (out / "notes.txt").read_text() == "mine"


def test_output_dir_may_not_be_an_input(tiny, tmp_path, capsys):
    model = tiny["model"]
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for out, how in ((model, ""), (model / "sub", "inside ")):
        status, err = run_cli(args_for(tiny, out), capsys)
        assert status == 2 and err == (f"error: OutputDirError: [train] output_dir {out} is {how}the [model] path "
                                       f"directory {model}: the run would write over its input; choose another "
                                       f"output_dir")
    ref = tmp_path / "ref"
    status, err = run_cli(args_for(tiny, ref, f"dpo.ref_model={ref}", stage="dpo", data="pref"), capsys)
    assert status == 2 and "is the [dpo] ref_model directory" in err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert not (model / "sub").exists()


def test_resume_with_nothing_to_resume_says_so(tiny, tmp_path, capsys):
    status, err = run_cli(args_for(tiny, tmp_path / "empty") + ["--resume"], capsys)
    assert status == 2 and err == (f"error: OutputDirError: --resume: nothing to resume in {tmp_path / 'empty'} "
                                   f"(no checkpoint under {tmp_path / 'empty' / 'checkpoints'})")


def test_a_checkpoint_of_another_stage_is_refused(tiny, tmp_path, capsys):
    """An sft checkpoint has the same trainable parameters as a full dpo run: the recorded stage tells them
    apart."""
    assert run_cli(args_for(tiny, tmp_path / "sft", "train.save_every=1"), capsys)[0] == 0
    ckpt = tmp_path / "sft" / "checkpoints" / "step-0000002"
    status, err = run_cli(args_for(tiny, tmp_path / "dpo", f"train.resume={ckpt}", stage="dpo", data="pref"), capsys)
    assert status == 2 and err == (f"error: TrainingError: {ckpt}: a checkpoint of a sft run cannot resume this dpo "
                                   f"run (start from that run's exported model: [model] path)")


def test_a_second_run_into_a_locked_directory_names_the_holder(tiny, tmp_path, capsys):
    """Another process holds the directory (as a running training would): a second run stops at once."""
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from minirlhf.config import load_config; "
         "from minirlhf.run_dir import claim_output_dir; "
         f"held = claim_output_dir(load_config(None, ['model.path=m', 'data.train_files=[\"d\"]', "
         f"'train.output_dir={out}'], 'sft')); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        status, err = run_cli(args_for(tiny, out), capsys)
        assert status == 2 and err == (f"error: OutputDirError: [train] output_dir {out} is in use by another run "
                                       f"(pid {holder.pid}, lock {out / '.minirlhf.lock'}); wait for it to finish "
                                       f"or choose another output_dir")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert run_cli(args_for(tiny, out), capsys)[0] == 0  # free again once the holder is gone


def test_claim_in_one_process_is_exclusive_and_released(tiny, tmp_path):
    cfg = load_config(None, [f"model.path={tiny['model']}", f"data.train_files=[\"{tiny['sft']}\"]",
                             f"train.output_dir={tmp_path / 'x'}"], "sft")
    first = claim_output_dir(cfg)
    with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
        claim_output_dir(cfg)
    first.release()
    claim_output_dir(cfg).release()


def test_unwritable_output_dir_is_a_one_line_error(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, err = run_cli(args_for(tiny, blocker / "out"), capsys)
    assert status == 2 and err == (f"error: OutputDirError: [train] output_dir {blocker / 'out'}: cannot write "
                                   f"{blocker / 'out'}: Not a directory")
    status, err = run_cli(args_for(tiny, blocker), capsys)
    assert status == 2 and err == f"error: OutputDirError: [train] output_dir {blocker} is a file, not a directory"


# ------------------------------------------------------------------------------ devices


def test_a_device_this_machine_lacks_is_a_one_line_error(tiny, tmp_path, capsys):
    status, err = run_cli(args_for(tiny, tmp_path / "d") + ["--device", "gpu0"], capsys)
    assert status == 2 and err == "error: DeviceError: --device 'gpu0' is not a device (cpu, cuda, cuda:N)"
    if not torch.cuda.is_available():
        status, err = run_cli(args_for(tiny, tmp_path / "d") + ["--device", "cuda"], capsys)
        assert status == 2 and err.startswith("error: DeviceError: --device cuda: CUDA is not available here")
    else:
        status, err = run_cli(args_for(tiny, tmp_path / "d") + ["--device", "cuda:99"], capsys)
        assert status == 2 and "there are" in err
    assert not (tmp_path / "d").exists()  # refused before anything was written


# ------------------------------------------------------------------------------ same config, same numbers


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_same_lora_config_gives_the_same_numbers(tiny, tmp_path, capsys, stage):
    """LoRA's initialisation (and dropout) draw from the global RNG while the stage is built; train.py seeds
    it first, so two runs in one process (whose RNG the first run moved on) agree exactly."""
    data = "sft" if stage == "sft" else "pref"
    sets = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.1", "train.max_steps=3"]
    for out in ("a", "b"):
        torch.rand(7)  # whatever the process drew before
        assert run_cli(args_for(tiny, tmp_path / out, *sets, stage=stage, data=data), capsys)[0] == 0
    a, b = numbers(tmp_path / "a"), numbers(tmp_path / "b")
    assert len(a) == 3 and a == b


def test_written_files_honour_the_umask(tiny, tmp_path, capsys):
    """safetensors writes through a 0600 temporary file; every file a run writes gets 0666 & ~umask."""
    old = os.umask(0o022)
    try:
        assert run_cli(args_for(tiny, tmp_path / "full", "train.save_every=1"), capsys)[0] == 0
        assert run_cli(args_for(tiny, tmp_path / "lora", "lora.enabled=true"), capsys)[0] == 0
    finally:
        os.umask(old)
    files = [p for d in ("full", "lora") for p in (tmp_path / d).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "adapter_model.safetensors"
                                                                      for p in files)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o644}
    assert not wrong


# ------------------------------------------------------------------------------ what a run shows


def test_info_lines_reach_stderr(tiny, tmp_path):
    cmd = [sys.executable, "train.py", *args_for(tiny, tmp_path / "log")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " INFO minirlhf.trainer: sft: steps 1 to 2, " in proc.stderr
    assert f"writing to {tmp_path / 'log'}" in proc.stderr


def test_threads_are_set_before_the_stage_is_built(tiny, tmp_path, monkeypatch):
    from minirlhf import sft

    seen = []
    real_build = sft.build_stage
    monkeypatch.setattr(sft, "build_stage", lambda *a, **k: seen.append(torch.get_num_threads()) or real_build(*a, **k))
    sets = [f"model.path={tiny['model']}", f"data.train_files=[\"{tiny['sft']}\"]",
            f"train.output_dir={tmp_path / 'th'}", "train.threads=2"]
    cfg = load_config(tiny["root"] / "cfg.toml", sets, "sft")
    try:
        trainer = train.build_trainer(cfg, "cpu")
        trainer.run_dir.release()
        assert seen == [2]
    finally:
        torch.set_num_threads(1)


def test_no_matplotlib_means_a_line_saying_so(tmp_path, monkeypatch, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with caplog.at_level(logging.WARNING, logger="minirlhf"):
        assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None
    assert "no curves.png: matplotlib is not installed" in caplog.text

