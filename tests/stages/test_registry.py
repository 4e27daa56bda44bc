"""The stage registry is the only list of stages, and a stage is a plug: one file (with its config section)
plus one registry line makes `minirlhf train --stage NAME` work, with nothing else edited. No stage
module imports another, and `distributed` reads nothing of a stage but what trainer.Stage declares."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from minirlhf import stages
from minirlhf.commands import train
from minirlhf.config import default_toml, load_config
from minirlhf.model import Transformer
from minirlhf.toml_fields import ConfigError
from tests.tiny import logps64, tiny_model_dir

PACKAGE = Path(stages.__file__).parent
SHARED = {"minirlhf.stages", "minirlhf.stages.common", "minirlhf.stages.rollout"}  # what stages may import


def test_every_registered_stage_declares_what_the_rest_asks_of_it():
    for name in stages.REGISTRY:
        spec = stages.spec(name)
        assert issubclass(spec.section, stages.StageSection) and spec.section.section == name
        assert spec.data_formats and callable(spec.build)


def test_no_stage_module_imports_another():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minirlhf.stages"):
                names = {f"{node.module}.{a.name}" for a in node.names} if node.module == "minirlhf.stages" \
                    else {node.module}
                stage_modules = {n for n in names if n.removeprefix("minirlhf.stages.") in
                                 {p.stem for p in PACKAGE.glob("*.py")}} - SHARED
                assert not stage_modules, f"{path.name} imports {stage_modules}"


def test_distributed_names_no_stage_attribute():
    source = (PACKAGE.parent / "distributed.py").read_text()
    tree = ast.parse(source)
    uses = {node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)}
    assert "stage" not in uses and "vars(" not in source and "getattr(stage" not in source


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(stages.REGISTRY, "toy", "tests.stages.plug_stage")  # the one registry line


def test_a_stage_is_one_file_and_one_registry_line(toy, tiny_tok, tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model", tiny_tok)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"The kettle {i} was good."}) + "\n" for i in range(8)))
    config = tmp_path / "toy.toml"
    config.write_text(f'stage = "toy"\n[model]\npath = {json.dumps(str(model))}\n'
                      f'[data]\ntrain_files = [{json.dumps(str(data))}]\nblock_size = 16\n'
                      f'[train]\noutput_dir = {json.dumps(str(tmp_path / "out"))}\nmax_steps = 2\nlog_every = 1\n'
                      f'micro_batch_size = 2\nprecision = "fp32"\n[toy]\ncoef = 0.5\n')
    # the command line, the config schema, the data format and the trainer all know the stage now
    assert train.main(["--stage", "toy", "--config", str(config), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # step 1's logged loss is coef (0.5, from [toy]) times the starting model's cross-entropy on the first batch,
    # recomputed here in float64 from its logits (a fresh tiny model: near 0.5 * ln 300 = 2.85)
    batch = next(stages.spec("toy").build(load_config(config, [])).batches)
    logps, counts = logps64(Transformer.from_pretrained(model), batch["input_ids"], batch["attention_mask"],
                            batch["labels"])
    expected = 0.5 * float(-logps.sum() / counts.sum())
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5) and abs(expected - 0.5 * math.log(300)) < 0.25
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "[toy]\n# factor of the language-model loss\ncoef = 1.0" in default_toml("toy")
    with pytest.raises(ConfigError, match=r"\[toy\] unknown key 'cof' \(did you mean 'coef'\?\)"):
        load_config(config, ["toy.cof=2"])
    with pytest.raises(ConfigError, match=r"\[toy\] coef must be > 0, got -1"):
        load_config(config, ["toy.coef=-1"])
    with pytest.raises(ConfigError, match=r'\[data\] format must be one of "auto", "text" for stage toy'):
        load_config(config, ['data.format="kto"'])
    capsys.readouterr()


def test_an_unregistered_stage_is_refused_with_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"stage must be one of pt, sft, rm, dpo, kto, ppo, grpo, got \"toy\""):
        load_config(None, ["model.path=m", 'data.train_files=["d"]'], stage="toy")
