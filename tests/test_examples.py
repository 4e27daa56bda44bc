"""The real-checkpoint example configs (configs/examples/*.toml): each loads and validates, says what
docs/training.md says it does, and (pointed at a tiny model and tiny data with --set) trains one step
through train.py, so every key in them is one the stages actually read.

The one-step runs keep each file's own settings (LoRA, dtype, precision, activation checkpointing, the
stage's hyperparameters) and override only the paths and the sizes that would make a CPU test slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minirlhf.config import iter_fields, load_config
from minirlhf.heads import RewardModel
from minirlhf.stages import REGISTRY
from tests.tiny import (
    answer,
    kto_rows,
    preference_rows,
    prompt,
    prompt_rows,
    tiny_model_config,
    tiny_model_dir,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "configs" / "examples"
# file -> (stage, model directory placeholder under models/)
EXPECTED = {
    "tinyllama_sft_lora.toml": ("sft", "TinyLlama-1.1B-Chat-v1.0"),
    "llama3_dpo_lora.toml": ("dpo", "Meta-Llama-3-8B-Instruct"),
    "qwen2_rm.toml": ("rm", "Qwen2-0.5B-Instruct"),
    "qwen2_ppo_lora.toml": ("ppo", "Qwen2-0.5B-Instruct"),
    "gpt2_pt.toml": ("pt", "gpt2"),
    "mistral_kto.toml": ("kto", "Mistral-7B-Instruct-v0.2"),
    "smollm2_grpo_arith.toml": ("grpo", "SmolLM2-135M-Instruct"),
}


def test_the_examples_are_the_documented_ones():
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(EXPECTED)
    doc = (ROOT / "docs" / "training.md").read_text()
    for name in EXPECTED:
        assert name in doc, f"docs/training.md does not mention configs/examples/{name}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_validates_with_placeholder_paths(name):
    """load_config accepts the file as is (it does not require the placeholder paths to exist), the stage
    is the one its name says, and relative paths resolve against the file to models/, data/ and runs/
    of the repository."""
    stage, model_dir = EXPECTED[name]
    cfg = load_config(EXAMPLES / name)
    assert cfg.stage == stage and stage in REGISTRY
    assert Path(cfg.model.path) == ROOT / "models" / model_dir
    assert all(ROOT / "data" in Path(f).parents for f in cfg.data.train_files)  # data/ or a folder in it
    assert Path(cfg.train.output_dir) == ROOT / "runs" / Path(name).stem
    text = (EXAMPLES / name).read_text()
    assert f"models/{model_dir}" in text.split("stage =")[0], "the header says where to download the model"


def test_examples_hold_the_settings_they_advertise():
    cfg = {name: load_config(EXAMPLES / name) for name in EXPECTED}
    sft = cfg["tinyllama_sft_lora.toml"]
    assert sft.lora.enabled and sft.lora.r == 16 and sft.lora.target_modules == "all-linear"
    assert sft.model.dtype == "bfloat16" and sft.train.precision == "bf16"
    assert sft.data.format in ("auto", "alpaca", "sharegpt")
    dpo = cfg["llama3_dpo_lora.toml"]
    # reference = the policy with adapters disabled (no ref_model under LoRA), precomputed once
    assert dpo.lora.enabled and dpo.dpo.ref_model == "" and dpo.dpo.reference == "precompute"
    ppo, rm = cfg["qwen2_ppo_lora.toml"], cfg["qwen2_rm.toml"]
    assert ppo.lora.enabled and ppo.ppo.ref_model == ""
    assert ppo.ppo.reward_model == rm.train.output_dir, "ppo must score with the reward model qwen2_rm trains"
    assert ppo.model.path == rm.model.path
    assert not rm.lora.enabled
    pt = cfg["gpt2_pt.toml"]
    assert pt.data.block_size == 1024 and not pt.lora.enabled
    kto = cfg["mistral_kto.toml"]
    assert kto.lora.enabled and kto.kto.ref_model == "" and kto.train.micro_batch_size >= 2
    grpo = cfg["smollm2_grpo_arith.toml"].grpo
    assert grpo.reward_functions == ["minirlhf.rewards:number_match"] and grpo.beta == 0.0  # no reference
    assert grpo.samples_per_prompt == 8 and grpo.max_new_tokens == 16 and grpo.dynamic_sampling


def test_a_misspelt_key_in_an_example_copy_is_caught(tmp_path):
    """The validation these tests rely on is strict: a copy with one key misspelt fails, naming it."""
    bad = tmp_path / "bad.toml"
    bad.write_text((EXAMPLES / "tinyllama_sft_lora.toml").read_text().replace("neftune_alpha", "neftune_alfa"))
    with pytest.raises(Exception, match="neftune_alfa"):
        load_config(bad)


def test_config_doc_tables_are_up_to_date(tmp_path, monkeypatch):
    """docs/config.md's tables are what its own regeneration snippet writes from iter_fields() today."""
    import re

    doc = (ROOT / "docs" / "config.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "config.md").write_text(re.sub(r"^<!-- BEGIN GENERATED -->$.*^<!-- END GENERATED -->$",
                                                        "<!-- BEGIN GENERATED -->\n<!-- END GENERATED -->",
                                                        doc, flags=re.DOTALL | re.MULTILINE))
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # noqa: S102 -- the doc's own snippet, the thing under test
    assert (tmp_path / "docs" / "config.md").read_text() == doc, \
        "docs/config.md is stale: run the snippet in it from the repository root"


def test_every_key_of_the_examples_is_documented():
    """docs/config.md lists every key the examples set (it is generated from iter_fields)."""
    import tomllib

    doc = (ROOT / "docs" / "config.md").read_text()
    known = {(s, k) for s, k, *_ in iter_fields()}
    for name in EXPECTED:
        raw = tomllib.loads((EXAMPLES / name).read_text())
        raw.pop("stage")
        for section, table in raw.items():
            for key in table:
                assert (section, key) in known, (name, section, key)
                assert f"| `{key}` |" in doc, f"docs/config.md has no row for [{section}] {key}"


# ------------------------------------------------------------------------------ one step each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    """A tiny tokenizer and llama directory, and a small file of each data format."""
    root = tmp_path_factory.mktemp("examples")
    tok = tiny_tok
    model = tiny_model_dir(root / "model", tok)
    RewardModel(tiny_model_config(tok)).save_pretrained(root / "reward_model")  # ppo refuses a causal LM
    n = 24
    files = {
        "sft": write_jsonl(root / "sft.jsonl", [{"instruction": prompt(i), "input": "", "output": answer(i, True)}
                                                 for i in range(n)]),
        "pt": write_jsonl(root / "pt.jsonl", [{"text": prompt(i) + " " + answer(i, i % 2 == 0)} for i in range(n)]),
        "rm": write_jsonl(root / "pref.jsonl", preference_rows(n)),
        "kto": write_jsonl(root / "kto.jsonl", kto_rows(n)),
        "ppo": write_jsonl(root / "prompts.jsonl", prompt_rows(n)),
        "grpo": write_jsonl(root / "arith.jsonl", [{"prompt": prompt(i), "answer": str(i)} for i in range(n)]),
    }
    files["dpo"] = files["rm"]
    return root, model, files


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_trains_one_step_on_a_tiny_model(name, tiny, tmp_path):
    root, model, files = tiny
    stage = EXPECTED[name][0]
    out = tmp_path / "run"
    sets = [f"model.path={model}", f"data.train_files=[{json.dumps(str(files[stage]))}]", f"train.output_dir={out}",
            "train.max_steps=1", "train.micro_batch_size=4", "train.grad_accum=2", "data.cutoff_len=48",
            "data.block_size=48", "data.eval_split=0.0"]
    if stage == "ppo":
        sets += [f"ppo.reward_model={root / 'reward_model'}", "ppo.prompts_per_rollout=4", "ppo.minibatch_size=4",
                 "ppo.micro_batch_size=2", "ppo.max_new_tokens=4"]
    if stage == "grpo":
        sets += ["grpo.prompts_per_rollout=2", "grpo.samples_per_prompt=2", "grpo.micro_batch_size=2",
                 "grpo.max_new_tokens=4", "train.threads=1"]
    from minirlhf.commands import train

    args = ["--config", str(EXAMPLES / name), "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    assert train.main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1
    cfg = load_config(EXAMPLES / name, sets)
    if cfg.lora.enabled:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["r"] == cfg.lora.r == 16
    else:
        assert (out / "config.json").exists()
