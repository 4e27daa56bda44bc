"""minirlhf.config: strict TOML loading, error messages, overrides, path resolution, round trips."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from minirlhf.config import Config, default_toml, iter_fields, load_config
from minirlhf.toml_fields import ConfigError

BASE = """
[model]
path = "models/base"
[data]
train_files = ["data/train.jsonl"]
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=(), stage="sft") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), stage)
    return str(info.value)


def test_unknown_key_names_file_section_and_suggests(tmp_path):
    path = write(tmp_path, BASE + "[train]\nlr_rate = 1e-4\n")
    assert error_of(path) == f"{path}: [train] unknown key 'lr_rate' (did you mean 'lr'?)"
    path = write(tmp_path, BASE + "[train]\nmax_step = 3\n")
    assert error_of(path) == f"{path}: [train] unknown key 'max_step' (did you mean 'max_steps'?)"
    path = write(tmp_path, BASE + "[model.init]\nhiden_size = 3\n")
    assert "[model.init] unknown key 'hiden_size' (did you mean 'hidden_size'?)" in error_of(path)


def test_unknown_section_and_misplaced_key(tmp_path):
    path = write(tmp_path, BASE + "[trian]\nlr = 1e-4\n")
    assert error_of(path) == f"{path}: unknown section [trian] (did you mean [train]?)"
    path = write(tmp_path, "kl_coef = 0.1\n" + BASE)
    assert error_of(path) == f"{path}: key 'kl_coef' must be inside a section (did you mean [ppo] kl_coef?)"


def test_wrong_types(tmp_path):
    path = write(tmp_path, BASE + '[train]\nlr = "fast"\n')
    assert error_of(path) == f'{path}: [train] lr must be a number, got string "fast"'
    path = write(tmp_path, BASE + "[train]\nmicro_batch_size = 2.5\n")
    assert error_of(path) == f"{path}: [train] micro_batch_size must be an integer, got float 2.5"
    path = write(tmp_path, BASE + "[lora]\nenabled = 1\n")
    assert "[lora] enabled must be a boolean (true/false), got integer 1" in error_of(path)
    path = write(tmp_path, BASE + "[lora]\ntarget_modules = 3\n")
    assert "[lora] target_modules must be a string or an array of strings, got integer 3" in error_of(path)
    # an integer is a fine float
    cfg = load_config(write(tmp_path, BASE + "[train]\nlr = 1\n"), [], "sft")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_missing_file_and_bad_toml(tmp_path):
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"config file not found: {missing.resolve()}"
    assert error_of(write(tmp_path, "[train\n")).startswith(f"{tmp_path / 'cfg.toml'}: invalid TOML:")


def test_bad_values_name_section_key_and_source(tmp_path):
    path = write(tmp_path, BASE + "[ppo]\nkl_coef = -1\n")
    assert error_of(path) == f"[ppo] kl_coef must be >= 0, got -1 ({path})"
    path = write(tmp_path, BASE + '[dpo]\nloss_type = "sigmod"\n')
    assert error_of(path, stage="dpo") == (
        f'[dpo] loss_type must be one of "sigmoid", "hinge", "ipo", "simpo", "orpo", got "sigmod" '
        f"(did you mean 'sigmoid'?) ({path})")
    # the value came from --set, so the error names the --set argument
    assert error_of(write(tmp_path, BASE), ["data.eval_split=1.5"]) == (
        "[data] eval_split must be in [0, 1), got 1.5 (--set data.eval_split=1.5)")
    path = write(tmp_path, BASE + "[model.init]\nnum_attention_heads = 4\nnum_key_value_heads = 3\n")
    assert "[model.init] num_key_value_heads must be a divisor of num_attention_heads = 4, got 3" in error_of(path)
    path = write(tmp_path, BASE + '[lora]\ntarget_modules = ["q_proj", "vproj"]\n')
    assert "target_modules has unknown module \"vproj\" (did you mean 'v_proj'?)" in error_of(path)
    path = write(tmp_path, BASE + "[dpo]\nlabel_smoothing = 0.1\nloss_type = \"ipo\"\n")
    assert "[dpo] label_smoothing must be 0 unless loss_type" in error_of(path, stage="dpo")


def test_ppo_batch_arithmetic(tmp_path):
    base = BASE + '[ppo]\nreward_model = "rm"\n'
    path = write(tmp_path, base + "prompts_per_rollout = 8\nsamples_per_prompt = 3\nminibatch_size = 5\n")
    assert error_of(path, stage="ppo") == (
        "[ppo] minibatch_size must divide prompts_per_rollout * samples_per_prompt = 8 * 3 = 24, got 5 "
        f"({path})")
    path = write(tmp_path, base + "prompts_per_rollout = 8\nminibatch_size = 4\nmicro_batch_size = 3\n")
    assert error_of(path, stage="ppo") == f"[ppo] micro_batch_size must divide minibatch_size = 4, got 3 ({path})"
    cfg = load_config(write(tmp_path, base + "prompts_per_rollout = 8\nsamples_per_prompt = 3\n"
                                             "minibatch_size = 6\nmicro_batch_size = 2\n"), [], "ppo")
    assert (cfg.ppo.minibatch_size, cfg.ppo.micro_batch_size) == (6, 2)
    assert "[ppo] reward_model must be set" in error_of(write(tmp_path, BASE), stage="ppo")


def test_stage_checks(tmp_path):
    path = write(tmp_path, 'stage = "dpo"\n' + BASE)
    assert load_config(path).stage == "dpo"
    assert error_of(path, stage="sft") == f'{path}: stage = "dpo" but the stage given is "sft"'
    assert "no stage given" in error_of(write(tmp_path, BASE), stage=None)
    assert "[data] format must be one of \"auto\", \"preference\" for stage dpo" in error_of(
        write(tmp_path, BASE + '[data]\nformat = "alpaca"\n'.replace("[data]\n", "")), ["data.format=alpaca"],
        stage="dpo")
    assert "[data] train_files must list at least one file" in error_of(None, ["model.path=m"])
    assert "[model] tokenizer must be set when path is empty" in error_of(None, ["data.train_files=['a.jsonl']"])


def test_overrides_parse_with_toml_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, BASE), [
        "train.lr=1e-4", "model.init.hidden_size=128", "lora.enabled=true", 'lora.target_modules=["q_proj"]',
        "train.betas=[0.9, 0.99]", "model.path=/abs/model dir", "dpo.ref_model=rel/ref", "train.schedule=linear",
    ], "sft")
    assert cfg.train.lr == 1e-4 and cfg.model.init.hidden_size == 128 and cfg.lora.enabled is True
    assert cfg.lora.target_modules == ["q_proj"] and cfg.train.betas == [0.9, 0.99]
    assert cfg.model.path == "/abs/model dir"  # not TOML, so taken as a bare string
    assert cfg.dpo.ref_model == str(tmp_path / "rel/ref")  # --set paths resolve against the cwd
    assert cfg.train.schedule == "linear"
    assert error_of(write(tmp_path, BASE), ["train.lr_rate=1"]) == (
        "--set train.lr_rate=1: [train] unknown key 'lr_rate' (did you mean 'lr'?)")
    assert error_of(write(tmp_path, BASE), ["train.lr"]) == "--set train.lr: expected section.key=value"
    assert "unknown section [trian]" in error_of(write(tmp_path, BASE), ["trian.lr=1"])
    assert error_of(write(tmp_path, BASE), ["train.lr=fast"]) == (
        '--set train.lr=fast: [train] lr must be a number, got string "fast"')


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, '[model]\npath = "models/base"\n'
                      '[data]\ntrain_files = ["data/train.jsonl", "/abs/x.jsonl"]\nchat_template = "{{ messages }}"\n'
                      '[train]\noutput_dir = "../runs/x"\nresume = "auto"\n', "c.toml")
    cfg = load_config(path, [], "sft")
    assert cfg.model.path == str(sub / "models/base")
    assert cfg.model.tokenizer_path == cfg.model.path
    assert cfg.data.train_files == [str(sub / "data/train.jsonl"), "/abs/x.jsonl"]
    assert cfg.train.output_dir == str(tmp_path / "runs/x")
    assert cfg.train.resume == "auto"  # a keyword, not a path
    assert cfg.data.chat_template == "{{ messages }}"  # inline Jinja, not a path
    path = write(sub, '[model]\npath = "m"\n[data]\ntrain_files = ["t.jsonl"]\nchat_template = "t/chat.jinja"\n')
    assert load_config(path, [], "sft").data.chat_template == str(sub / "t/chat.jinja")
    path.write_text(path.read_text().replace("t/chat.jinja", "chatml"))
    assert load_config(path, [], "sft").data.chat_template == "chatml"  # a built-in template name


def test_round_trip_to_toml_and_save(tmp_path):
    template = '{% for m in messages %}\\n\\"x\\"{% endfor %}'  # TOML escapes \n and \"
    cfg = load_config(write(tmp_path, '[model]\npath = "models/base"\n'
                                      f'[data]\ntrain_files = ["d.jsonl"]\nchat_template = "{template}"\n'
                                      "[train]\nlr = 3e-4\nbetas = [0.8, 0.9]\n[ppo]\nkl_coef = 0.2\n"),
                      ["model.init.model_type=gpt2", "lora.target_modules=['q_proj', 'v_proj']"], "sft")
    assert cfg.data.chat_template == '{% for m in messages %}\n"x"{% endfor %}'
    saved = cfg.save(tmp_path / "out")
    assert saved == tmp_path / "out" / "config.toml"
    again = load_config(saved, [], "sft")
    assert again == cfg
    assert load_config(write(tmp_path, cfg.to_toml(comments=False), "plain.toml")) == cfg
    assert again.model.init.model_type == "gpt2" and again.lora.target_modules == ["q_proj", "v_proj"]
    assert again.ppo.kl_coef == 0.2


def test_default_toml_documents_every_field():
    text = default_toml("sft")
    parsed = tomllib.loads(text)
    rows = list(iter_fields())
    assert len(rows) > 100
    for section, key, type_name, default, help_ in rows:
        assert help_ and type_name and default, (section, key)
        table = parsed
        for part in section.split("."):
            table = table[part]
        assert key in table, (section, key)
        assert f"# {help_}\n{key} = {default}" in text
    # the defaults render to what Config() holds
    cfg = Config()
    assert parsed["train"]["lr"] == cfg.train.lr and parsed["ppo"]["kl_estimator"] == cfg.ppo.kl_estimator
    assert parsed["model"]["init"] == dataclasses.asdict(cfg.model.init)


def test_other_trainers_key_names_point_to_ours(tmp_path):
    """transformers/TRL names get our key, in its own section when they were given in another (spelling alone
    sent `lr_schedule` to 'lr' and `adam_beta2` to 'adam_eps')."""
    path = write(tmp_path, BASE)
    expected = {
        "train.gradient_accumulation_steps=4": "[train] unknown key 'gradient_accumulation_steps' (did you mean "
                                               "'grad_accum'?)",
        "train.per_device_train_batch_size=8": "(did you mean 'micro_batch_size'?)",
        "train.lr_scheduler_type=linear": "(did you mean 'schedule'?)",
        "train.lr_schedule=linear": "(did you mean 'schedule'?)",
        "train.learning_rate=1e-5": "(did you mean 'lr'?)",
        "train.num_train_epochs=3": "(did you mean 'epochs'?)",
        "train.max_length=512": "[train] unknown key 'max_length' (did you mean [data] cutoff_len?)",
        "train.bf16=true": '(did you mean precision = "bf16"?)',
        "train.adam_beta2=0.999": "(did you mean betas = [beta1, beta2]?)",
        "dpo.precompute_ref_log_probs=true": '(did you mean reference = "precompute"?)',
        "train.precompute_ref_log_probs=true": '(did you mean [dpo] reference = "precompute"?)',
        "train.optim=adamw_torch": "(the optimizer is always AdamW, set by [train] betas, adam_eps and weight_decay)",
        "train.beta=0.1": "(did you mean [dpo] beta or [kto] beta or [grpo] beta?)",  # a key of other sections
        "model.hidden_size=64": "(did you mean [model.init] hidden_size?)",
    }
    for override, hint in expected.items():
        assert error_of(path, [override]).endswith(hint), override
    path = write(tmp_path, "gradient_accumulation_steps = 4\n" + BASE)
    assert error_of(path) == (f"{path}: key 'gradient_accumulation_steps' must be inside a section (did you mean "
                              f"[train] grad_accum?)")


def test_every_ecosystem_pointer_names_a_real_key():
    from minirlhf.toml_fields import ECOSYSTEM_KEYS

    known = {(s, k) for s, k, *_ in iter_fields()}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for name, (section, key, _, remark) in ECOSYSTEM_KEYS.items():
        assert (section, key) in known or (not key and remark), name
        assert (section, name) not in known, f"{name} is one of our keys"
        assert f"`{name}`" in doc or name in ("lr_schedule", "scheduler", "batch_size"), \
            f"docs/config.md's table of other trainers' names lacks {name}"


def test_numbers_must_be_finite_and_new_keys(tmp_path):
    path = write(tmp_path, BASE)
    # every float key of every section refuses TOML's inf and nan, before any range check
    assert error_of(path, ["train.lr=inf"]) == "[train] lr must be a finite number, got inf (--set train.lr=inf)"
    assert error_of(path, ["train.lr=nan"]) == "[train] lr must be a finite number, got nan (--set train.lr=nan)"
    assert "[train] weight_decay must be a finite number, got inf" in error_of(path, ["train.weight_decay=inf"])
    assert "[train] betas must be finite numbers, got [0.9, nan]" in error_of(path, ["train.betas=[0.9, nan]"])
    assert "[ppo] kl_coef must be a finite number, got inf" in error_of(path, ["ppo.kl_coef=inf"])
    assert "[lora] alpha must be a finite number, got -inf" in error_of(path, ["lora.alpha=-inf"])
    assert "[model.init] rope_theta must be a finite number, got nan" in error_of(path, ["model.init.rope_theta=nan"])
    toml = tmp_path / "inf.toml"
    toml.write_text(BASE + "\n[dpo]\nbeta = inf\n")
    assert error_of(toml, []) == f"[dpo] beta must be a finite number, got inf ({toml})"
    assert "[train] threads must be >= 0, got -1" in error_of(path, ["train.threads=-1"])
    assert "[train] overwrite must be false when resuming" in error_of(path, ["train.overwrite=true",
                                                                            'train.resume="auto"'])
    cfg = load_config(path, ["train.threads=2", "train.overwrite=true"], "sft")
    assert (cfg.train.threads, cfg.train.overwrite) == (2, True)


def test_reward_norm_booleans_of_older_configs_still_load(tmp_path):
    # [ppo] reward_norm was a boolean before it became none | running | rm; old configs keep working
    for value, meaning in (("true", "running"), ("false", "none"), ('"rm"', "rm")):
        cfg = load_config(None, ["model.tokenizer=/tok", 'data.train_files=["/d.jsonl"]',
                                 "ppo.reward_model=/rm", f"ppo.reward_norm={value}"], stage="ppo")
        assert cfg.ppo.reward_norm == meaning
