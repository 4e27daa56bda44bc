"""The `minirlhf` command: one --help listing every command, `python -m minirlhf` and the console script,
`python train.py` unchanged, one-line errors without a traceback, `minirlhf merge` (against the LoRA
forward it folds) and `minirlhf export` (a reward model directory again, and an rm checkpoint saved as its
run would have saved it, checked against that run's own output and transformers).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers_tiny import preference_rows, tiny_model_dir, tiny_tokenizer, write_jsonl

from minirlhf import cli
from minirlhf.commands.loading import load_policy, resolve_model_paths
from minirlhf.heads import RewardModel
from minirlhf.lora import LoRAConfig, inject_lora, lora_layers, save_adapter
from minirlhf.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def run_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base model, and a LoRA adapter on it with non-zero B (so merging changes the weights)."""
    d = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer(d / "tok")
    base = tiny_model_dir(d / "base", tok)
    model = Transformer.from_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.2)
    save_adapter(model, d / "adapter", base_model_name_or_path=str(base))
    tok.save_pretrained(str(d / "adapter"))
    return {"dir": d, "tok": tok, "base": base, "adapter": d / "adapter", "lora_model": model.eval()}


def test_help_lists_every_command_and_each_command_documents_itself(capsys):
    proc = run_process("-m", "minirlhf", "--help")
    assert proc.returncode == 0
    listing = " ".join(proc.stdout.split())  # argparse wraps long lines
    for name, module in cli.COMMANDS.items():
        assert f"{name} {' '.join(module.HELP.split())}" in listing
    wanted = {"train": ["--stage", "--config", "--set", "--resume"],
              "chat": ["--model", "--adapter", "--no-merge", "--system", "--temperature", "--top-p",
                       "--max-new-tokens", "/reset", "/system", "/exit", "Ctrl-C"],
              "generate": ["--prompts", "--out", "--samples", "--batch-size", "--raw", "finish_reason", "resum"],
              "eval": ["--reward-model", "--baseline", "--reward-functions", "--reference", "--perplexity",
                       "win rate", "bootstrap"],
              "merge": ["--adapter", "--base", "--out"], "export": ["--model", "--checkpoint", "--out"]}
    for name, words in wanted.items():
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words), (name, [w for w in words if w not in text])


def test_the_console_script_is_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["minirlhf"].partition(":")
    assert getattr(importlib.import_module(module), name) is cli.main


def test_train_py_is_the_train_command(tiny, tmp_path):
    import train
    from minirlhf.commands import train as command

    assert train.main is command.main and train.build_trainer is command.build_trainer
    proc = run_process("train.py", "--help")
    assert proc.returncode == 0 and "--stage" in proc.stdout and "--resume" in proc.stdout
    proc = run_process("train.py", "--stage", "sft", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ConfigError: config file not found")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Review the kettle.", "output": "It was good."}] * 8)
    config = tmp_path / "sft.toml"
    config.write_text(f'stage = "sft"\n[model]\npath = {json.dumps(str(tiny["base"]))}\n'
                      f'[data]\ntrain_files = [{json.dumps(str(data))}]\ncutoff_len = 64\n'
                      f'[train]\noutput_dir = {json.dumps(str(tmp_path / "out"))}\nmax_steps = 2\n'
                      f'micro_batch_size = 4\nprecision = "fp32"\n')
    assert cli.main(["train", "--config", str(config), "--set", "train.lr=1e-4", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert tomllib.loads((tmp_path / "out" / "config.toml").read_text())["train"]["lr"] == 1e-4  # --set applied


def test_user_errors_are_one_line_without_a_traceback(tiny, tmp_path):
    lone = tmp_path / "lone_adapter"
    lone.mkdir()
    config = json.loads((tiny["adapter"] / "adapter_config.json").read_text())
    (lone / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    gone = tmp_path / "gone_adapter"
    gone.mkdir()
    (gone / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/no/such/base"}))
    cases = {
        ("chat", "--model", str(tmp_path)): "is not a model directory: it has no config.json",
        ("chat", "--model", str(lone)): "names no base model",
        ("generate", "--model", str(gone), "--prompts", "p.jsonl", "--out", "o.jsonl"): "is not a model directory here",
        ("chat", "--model", str(tiny["base"]), "--adapter", str(tiny["base"])): "is not a LoRA adapter directory",
    }
    for args, message in cases.items():
        proc = run_process("-m", "minirlhf", *args)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and message in err, (args, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_adapters_run_merged_or_unmerged_with_the_lora_forward(tiny):
    ids = torch.tensor([tiny["tok"].encode("Review the kettle. The kettle was good.")])
    with torch.no_grad():
        expected = tiny["lora_model"](ids)
        for paths in (resolve_model_paths(tiny["adapter"]),  # the base named by adapter_config.json
                      resolve_model_paths(tiny["base"], tiny["adapter"])):
            for merge in (True, False):
                model = load_policy(paths, merge=merge)
                assert any(True for _ in lora_layers(model)) != merge
                torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_writes_the_folded_model_and_never_overwrites(tiny, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(tiny["adapter"]), "--out", str(out)]) == 0
    ids = torch.tensor([tiny["tok"].encode("Review the hotel.")])
    merged = Transformer.from_pretrained(out)
    assert not any(True for _ in lora_layers(merged))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), tiny["lora_model"](ids), atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer_config.json").exists()
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(["merge", "--adapter", str(tiny["adapter"]), "--base", str(tiny["base"]), "--out", str(out)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before

    from minirlhf import lora  # the older spelling keeps working

    lora.main(["merge", "--base", str(tiny["base"]), "--adapter", str(tiny["adapter"]), "--out", str(tmp_path / "m2")])
    assert (tmp_path / "m2" / "model.safetensors").read_bytes() == before


def scores(rm_dir: Path, ids: list[torch.Tensor]) -> torch.Tensor:
    """The reward model's score of each sequence [1, T], run alone."""
    rm = RewardModel.from_pretrained(rm_dir).eval()
    with torch.no_grad():
        return torch.cat([rm(row) for row in ids])


def test_export_a_reward_model_and_an_rm_checkpoint(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    config = tmp_path / "rm.toml"
    run = tmp_path / "rm_run"
    config.write_text(f'stage = "rm"\n[model]\npath = {json.dumps(str(tiny["base"]))}\n'
                      f'[data]\ntrain_files = [{json.dumps(str(data))}]\ncutoff_len = 64\n'
                      f'[train]\noutput_dir = {json.dumps(str(run))}\nmax_steps = 4\nsave_every = 2\n'
                      f'micro_batch_size = 4\nlr = 3e-3\nprecision = "fp32"\n[lora]\nenabled = true\nr = 4\n')
    assert cli.main(["train", "--config", str(config), "--device", "cpu"]) == 0
    ids = [torch.tensor([tiny["tok"].encode(f"Review the kettle. The kettle was {word}.")]) for word in ("good", "bad")]

    # the last checkpoint holds the weights the run ended with: its export is the run's own output
    out = tmp_path / "from_checkpoint"
    assert cli.main(["export", "--checkpoint", str(run / "checkpoints" / "step-0000004"), "--out", str(out)]) == 0
    torch.testing.assert_close(scores(out, ids), scores(run, ids), atol=1e-5, rtol=1e-5)
    stats = [json.loads((d / "config.json").read_text())["minirlhf_reward_stats"] for d in (out, run)]
    assert stats[0] == pytest.approx(stats[1], rel=1e-4)
    good, bad = scores(out, ids).tolist()
    assert good > bad  # four steps on "good" over "bad" pairs

    # an earlier checkpoint: the LoRA weights of step 2, merged; transformers reads the same scores
    early = tmp_path / "step2"
    assert cli.main(["export", "--checkpoint", str(run / "checkpoints" / "step-0000002"), "--out", str(early)]) == 0
    assert not torch.allclose(scores(early, ids), scores(run, ids))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(early).eval()
    with torch.no_grad():
        for row in ids:  # one sequence at a time: no padding question
            torch.testing.assert_close(hf(row).logits[0, 0], scores(early, [row])[0], atol=1e-4, rtol=1e-4)

    again = tmp_path / "again"
    assert cli.main(["export", "--model", str(run), "--out", str(again), "--dtype", "bfloat16"]) == 0
    torch.testing.assert_close(scores(again, ids).float(), scores(run, ids), atol=0.1, rtol=0.05)
    assert cli.main(["export", "--model", str(tiny["base"]), "--out", str(tmp_path / "x")]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(run), "--out", str(again)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_a_lora_run_names_its_base_so_its_output_loads_alone(tmp_path, tiny):
    """An sft run with LoRA writes an adapter whose adapter_config.json names the model it started
    from, so `minirlhf chat --model <run>` / load_policy find the base without --adapter."""
    from helpers_tiny import answer, prompt, tiny_config

    from minirlhf import sft
    from minirlhf.trainer import Trainer

    rows = [{"instruction": prompt(i), "output": answer(i, True)} for i in range(8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = tiny_config("sft", tiny["base"], data, tmp_path / "run", "train.max_steps=1", "lora.enabled=true")
    Trainer(cfg, sft.build_stage(cfg)).fit()
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny["base"])
    paths = resolve_model_paths(tmp_path / "run")
    assert paths.base == tiny["base"] and paths.adapter == tmp_path / "run"
    assert isinstance(load_policy(paths), Transformer)
