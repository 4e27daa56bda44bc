"""The grpo stage on a tiny llama policy: the data row's fields reach the reward functions, no reference
model exists when beta = 0, the on-policy update runs no forward besides its own, num_iterations = 2 makes
two updates with the first pass's log-probs as the old ones, dynamic sampling refills and stops at its
bound, a reward model as a reward source, exact resume, the bad inputs refused before any compute, and
`minirlhf train --stage grpo` end to end on a tiny arithmetic set.

The reward functions are small Python files written here: `length` (the answer's characters) varies
between the answers of a prompt, so groups carry a signal; `constant` never does.
"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch

from minirlhf.commands.generate import generate_answers, read_prompts
from minirlhf.commands.sampling import Sampling
from minirlhf.errors import TrainingError
from minirlhf.heads import RewardModel
from minirlhf.model import Transformer
from minirlhf.rewards import RewardError
from minirlhf.stages import grpo as grpo_module
from minirlhf.stages.grpo import GRPOStage, build_stage
from minirlhf.stages.rollout import RewardModelScorer, concat_rollouts, response_logprobs
from minirlhf.tasks.arithmetic import make_arithmetic_data
from minirlhf.tokenizer import load_tokenizer
from minirlhf.toml_fields import ConfigError
from minirlhf.trainer import Trainer
from tests.tiny import (
    prompt,
    prompt_rows,
    tiny_config,
    tiny_model_dir,
    tiny_reward_model_dir,
    write_jsonl,
)

TIME_KEYS = ("time/generate", "time/logprobs", "time/score", "time/train", "time/step", "tokens_per_s")

REWARDS = '''
def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def constant(prompts, completions):
    return [1.0] * len(completions)


def one_short(prompts, completions):
    return [0.0] * (len(completions) - 1)


def kettle_constant(prompts, completions):
    """Constant for the kettle prompt (an uninformative group), the answer's length for the others."""
    return [1.0 if "kettle" in p else float(len(c)) for p, c in zip(prompts, completions)]


def needs_answer(prompts, completions, answer):
    return [float(a == "0") for a in answer]
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("grpo")
    policy = tiny_model_dir(root / "policy", tiny_tok, seed=0)
    rows = [{"prompt": prompt(i), "answer": str(i), "topic_id": i} for i in range(16)]
    (root / "my_rewards.py").write_text(REWARDS)
    return {"root": root, "tok": tiny_tok, "policy": policy, "prompts": write_jsonl(root / "prompts.jsonl", rows),
            "rewards": root / "my_rewards.py"}


def grpo_config(tiny, out: Path, *overrides: str, functions: tuple[str, ...] = ("length",)):
    specs = json.dumps([f"{tiny['rewards']}:{f}" for f in functions])
    sets = [f"grpo.reward_functions={specs}", "grpo.prompts_per_rollout=2", "grpo.samples_per_prompt=4",
            "grpo.micro_batch_size=4", "grpo.max_new_tokens=6", "grpo.log_samples_every=1", "train.max_steps=2"]
    return tiny_config("grpo", tiny["policy"], tiny["prompts"], out, *sets, *overrides)


def live_transformers() -> int:
    gc.collect()
    return sum(type(o) is Transformer for o in gc.get_objects())


# --------------------------------------------------------------------------------------------------
# what reaches the reward functions


def test_row_fields_reach_the_reward_functions_prompt_major(tiny, tmp_path):
    """A function receives the rows' prompts (as the rows give them), their other columns and the answers'
    token counts, each repeated for the G answers of a prompt; the G answers of a prompt are adjacent."""
    cfg = grpo_config(tiny, tmp_path / "out")
    stage = build_stage(cfg)
    calls = []

    def record(prompts, completions, answer, topic_id, completion_lengths):
        calls.append((prompts, completions, answer, topic_id, completion_lengths))
        return [0.0] * len(completions)

    stage.reward_functions = [grpo_module.as_reward_function(record)]
    torch.manual_seed(0)
    rollout, rewards, _, _ = stage.experience(Trainer(cfg, stage, "cpu"))
    prompts, completions, answer, topic_id, lengths = calls[0]
    assert len(prompts) == len(completions) == rollout.size == 8 and rewards.shape == (8, 1)
    # no shuffle: the first two rows of the file, each 4 times
    assert prompts == [prompt(0)] * 4 + [prompt(1)] * 4
    assert answer == ["0"] * 4 + ["1"] * 4 and topic_id == [0] * 4 + [1] * 4
    assert lengths == rollout.response_mask.sum(-1).tolist()
    _, decoded = grpo_module.decode_rollout(tiny["tok"], rollout)
    assert completions == decoded


def test_concat_rollouts_repads_prompts_and_answers(tiny, tmp_path):
    """Two rollouts of different prompt and answer widths concatenated: each row's log-probs are unchanged."""
    cfg = grpo_config(tiny, tmp_path / "out")
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    torch.manual_seed(0)
    a, _, _ = stage.sample(trainer, "a")
    stage.cfg.grpo.max_new_tokens = 3
    b, _, _ = stage.sample(trainer, "b")
    both = concat_rollouts([a, b], tiny["tok"].pad_id)
    assert both.size == a.size + b.size and both.prompt_len == max(a.prompt_len, b.prompt_len)
    with torch.no_grad():
        parts = [response_logprobs(stage.model, r.input_ids, r.attention_mask, r.response_mask, r.prompt_len)[0]
                 for r in (a, b, both)]
    n_a, n_b = a.response_mask.shape[1], b.response_mask.shape[1]
    torch.testing.assert_close(parts[2][: a.size, :n_a], parts[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[2][a.size:, :n_b], parts[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(both.has_stop, torch.cat([a.has_stop, b.has_stop]))


# --------------------------------------------------------------------------------------------------
# paying only for what the settings use


@pytest.mark.parametrize("lora", [False, True])
def test_no_reference_model_exists_when_beta_is_zero(tiny, tmp_path, lora):
    lora_sets = ("lora.enabled=true", "lora.r=4") if lora else ()
    before = live_transformers()
    stage = build_stage(grpo_config(tiny, tmp_path / "a", *lora_sets))
    assert stage.reference is None and stage.frozen_modules() == []
    assert live_transformers() - before == 1  # the policy alone
    del stage
    before = live_transformers()
    stage = build_stage(grpo_config(tiny, tmp_path / "b", "grpo.beta=0.04", *lora_sets))
    # full fine-tuning: a frozen copy, sharded like the policy; LoRA: the policy with its adapters off
    assert live_transformers() - before == (1 if lora else 2)
    assert stage.reference.adapters_off == lora
    assert len(stage.frozen_modules()) == (0 if lora else 1)


def count_forwards(monkeypatch) -> list[bool]:
    """Every full forward of any Transformer (generation's cached steps excluded): whether grad was on."""
    calls = []
    original = Transformer.hidden_states

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden_states", counted)
    return calls


def test_on_policy_update_runs_no_extra_forward(tiny, tmp_path, monkeypatch):
    """mu = 1 and one update per rollout: the 8 sequences run as 2 micro-batches, so exactly 2 forwards (both
    with grad, the update's own) and a ratio of exactly 1 (nothing clipped). With 2 updates per pass
    (minibatch_size 4) the old log-probs must be measured first: 2 forwards more, without grad."""
    cfg = grpo_config(tiny, tmp_path / "a")
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    calls = count_forwards(monkeypatch)
    torch.manual_seed(0)
    metrics = stage.train_step(trainer).metrics
    assert calls == [True, True]
    assert metrics["updates"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0

    cfg = grpo_config(tiny, tmp_path / "b", "grpo.minibatch_size=4")
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    calls.clear()
    torch.manual_seed(0)
    metrics = stage.train_step(trainer).metrics
    assert calls == [False, False, True, True] and metrics["updates"] == 2.0


def test_two_iterations_make_two_updates_with_the_first_pass_as_old_policy(tiny, tmp_path, monkeypatch):
    """num_iterations = 2 with one update per pass: the first pass is on-policy (old = its own log-probs, ratio
    1); the second reuses those recorded log-probs as old ones while the policy has moved (ratio != 1)."""
    cfg = grpo_config(tiny, tmp_path / "out", "grpo.num_iterations=2", "grpo.micro_batch_size=8", "train.lr=1e-2")
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    seen = []
    original = grpo_module.grpo_policy_loss

    def recording(logprobs, old_logprobs, *args, **kwargs):
        seen.append((logprobs.detach().clone(), old_logprobs.detach().clone()))
        return original(logprobs, old_logprobs, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_policy_loss", recording)
    calls = count_forwards(monkeypatch)
    torch.manual_seed(0)
    metrics = stage.train_step(trainer).metrics
    assert metrics["updates"] == 2.0 and calls == [True, True]
    (first, first_old), (second, second_old) = seen
    assert torch.equal(first, first_old)  # on-policy: ratio exactly 1
    assert torch.equal(second_old, first)  # the recorded log-probs of the first pass
    assert (second - second_old).abs().max() > 1e-4  # the update moved the policy


# --------------------------------------------------------------------------------------------------
# dynamic sampling


def test_dynamic_sampling_drops_equal_groups_and_refills(tiny, tmp_path):
    """The first batch holds the kettle prompt (every answer rewarded 1: no signal) and the movie prompt; the
    kettle group is dropped and one more round draws hotel and pizza: the batch becomes movie and hotel."""
    cfg = grpo_config(tiny, tmp_path / "out", "grpo.dynamic_sampling=true", functions=("kettle_constant",))
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    torch.manual_seed(0)
    rollout, rewards, rounds, timings = stage.experience(trainer)
    assert len(rounds) == 2 and timings["dynamic_sampling/extra_rollouts"] == 1.0
    assert timings["dynamic_sampling/filled_groups"] == 0.0
    prompts, _ = grpo_module.decode_rollout(tiny["tok"], rollout)
    assert ["movie" in p for p in prompts] == [True] * 4 + [False] * 4
    assert ["hotel" in p for p in prompts] == [False] * 4 + [True] * 4
    assert rollout.size == 8 and rewards.shape == (8, 1)
    assert (rewards.view(2, 4).amax(1) > rewards.view(2, 4).amin(1)).all()
    # the rows and rewards are the groups' own: movie's from round 1 (rows 4-7), hotel's from round 2 (rows 0-3)
    torch.testing.assert_close(rewards[:4], rounds[0][1][4:])
    torch.testing.assert_close(rewards[4:], rounds[1][1][:4])


def test_dynamic_sampling_stops_at_its_bound(tiny, tmp_path):
    """No group ever carries a signal: 1 + max_extra_rollouts rounds are drawn, then the batch is filled with
    dropped groups, and training goes on (all advantages 0)."""
    cfg = grpo_config(tiny, tmp_path / "out", "grpo.dynamic_sampling=true", "grpo.max_extra_rollouts=2",
                      functions=("constant",))
    stage = build_stage(cfg)
    trainer = Trainer(cfg, stage, "cpu")
    torch.manual_seed(0)
    metrics = stage.train_step(trainer).metrics
    assert metrics["dynamic_sampling/extra_rollouts"] == 2.0 and metrics["dynamic_sampling/filled_groups"] == 2.0
    assert stage.batches.state_dict()["position"] == 3 * 2  # three rounds of 2 prompts
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["loss"] == 0.0


# --------------------------------------------------------------------------------------------------
# a reward model as a reward source


def test_a_reward_model_is_one_more_reward_source(tiny, tmp_path):
    tiny_reward_model_dir(tmp_path / "rm", tiny["tok"])
    cfg = grpo_config(tiny, tmp_path / "out", f"grpo.reward_model={tmp_path / 'rm'}", "grpo.reward_weights=[1.0, 2.0]")
    stage = build_stage(cfg)
    assert stage.names == ["length", "reward_model"] and stage.frozen_modules() == [stage.scorer.reward_model]
    trainer = Trainer(cfg, stage, "cpu")
    torch.manual_seed(0)
    rollout, rewards, _, _ = stage.experience(trainer)
    alone = RewardModelScorer(RewardModel.from_pretrained(tmp_path / "rm"), 8)(rollout)
    torch.testing.assert_close(rewards[:, 1], alone)
    metrics = stage.reward_metrics(rewards)
    expected = float((rewards[:, 0] + 2.0 * rewards[:, 1]).mean())  # the weights of the two sources
    assert metrics["reward"] == pytest.approx(expected, rel=1e-5)
    assert metrics["rewards/reward_model/mean"] == pytest.approx(float(alone.mean()), rel=1e-5)
    # the reward model alone is enough; one of another vocabulary is refused at build time
    build_stage(grpo_config(tiny, tmp_path / "o2", f"grpo.reward_model={tmp_path / 'rm'}", functions=()))
    tiny_reward_model_dir(tmp_path / "small_rm", tiny["tok"], vocab_size=200)
    with pytest.raises(ConfigError, match=r"^\[grpo\] reward_model: the tokenizer at .* has 300 tokens"):
        build_stage(grpo_config(tiny, tmp_path / "o3", f"grpo.reward_model={tmp_path / 'small_rm'}"))


# --------------------------------------------------------------------------------------------------
# resume


def test_resume_matches_a_straight_run(tiny, tmp_path):
    """3 straight steps (checkpoint at step 2) vs. resuming that checkpoint: step 3's metrics are equal, with
    the data position moved by dynamic sampling and two passes per rollout."""
    extra = ("train.max_steps=3", "train.save_every=2", "train.keep_last=5", "grpo.num_iterations=2",
             "grpo.dynamic_sampling=true", "data.shuffle=true", "train.schedule=\"cosine\"", "train.warmup_steps=1",
             "grpo.beta=0.1")
    functions = ("kettle_constant",)
    straight = grpo_config(tiny, tmp_path / "a", *extra, functions=functions)
    Trainer(straight, build_stage(straight), "cpu").fit()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000002"
    assert checkpoint.is_dir()
    resumed = grpo_config(tiny, tmp_path / "b", *extra, f"train.resume={checkpoint}", functions=functions)
    Trainer(resumed, build_stage(resumed), "cpu").fit()
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    a3, b3 = rows[2], rows_b[0]
    assert a3["step"] == b3["step"] == 3 and a3["kl"] > 0 and a3["num_tokens"] > rows[1]["num_tokens"]
    for key, value in a3.items():
        if key not in TIME_KEYS:
            assert b3[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# --------------------------------------------------------------------------------------------------
# bad input: one line, before any compute


@pytest.mark.parametrize("override, message", [
    ('grpo.loss_type="ppo"', r'^\[grpo\] loss_type must be one of "grpo", "bnpo", "dapo", "dr_grpo", "cispo", '
                             r'got "ppo"'),
    ('grpo.estimator="gae"', r'^\[grpo\] estimator must be one of "grpo", "rloo", got "gae"'),
    ("grpo.samples_per_prompt=1", r"^\[grpo\] samples_per_prompt must be >= 2 \(advantages compare the answers to "
                                  r"one prompt\), got 1"),
    ("grpo.reward_weights=[1.0, 2.0]", r"^\[grpo\] reward_weights must have one weight per reward source \(1: 1 "
                                       r"reward_functions\) or be \[\], got 2"),
    ('grpo.reward_kwargs={"x.py:f" = {a = 1}}', r'^\[grpo\] reward_kwargs names "x.py:f", which is not in '
                                                 r'reward_functions'),
    ('grpo.reward_kwargs={length = {scale = 2}}', r"^\[grpo\] reward_functions: reward function '.*my_rewards.py:"
                                                  r"length': cannot set parameter 'scale'"),
    ('grpo.estimator="rloo"', r'^\[grpo\] scale_rewards must be "none" or "batch" with estimator = "rloo"'),
    ("grpo.micro_batch_size=3", r"^\[grpo\] micro_batch_size must divide the rollout's 8 sequences, got 3"),
    ('grpo.reward_functions=["minirlhf.rewards:number_macth"]', r"^\[grpo\] reward_functions: reward function "
                                                                 r"'minirlhf.rewards:number_macth': minirlhf.rewards "
                                                                 r"has no attribute 'number_macth'; did you mean "
                                                                 r"'number_match'\?"),
    ('grpo.reward_functions=["no_such_file.py:f"]', r"^\[grpo\] reward_functions: reward function .*no_such_file.py:f"
                                                    r"': no file .*no_such_file.py"),
    ("grpo.reward_functions=[]", r"^\[grpo\] reward_functions must name at least one function"),
])
def test_bad_settings_are_one_line_config_errors(tiny, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        grpo_config(tiny, tmp_path / "out", override)
    assert "\n" not in str(err.value)


def test_a_data_row_without_a_needed_field_is_refused_before_any_model_loads(tiny, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(grpo_module, "build_model", no_model)
    cases = [  # no row has the field; one row lacks it
        (prompt_rows(4),
         r"needs the field 'answer', which the data rows lack \(their columns: none besides the prompt\)"),
        ([{"prompt": prompt(0), "answer": "0"}, {"prompt": prompt(1)}],
         r"needs the field 'answer', which training row 2 \(prompt 'Review the movie.'\) lacks"),
    ]
    for i, (rows, message) in enumerate(cases):
        data = write_jsonl(tmp_path / f"rows{i}.jsonl", rows)
        cfg = tiny_config("grpo", tiny["policy"], data, tmp_path / "out", "grpo.prompts_per_rollout=2",
                          f'grpo.reward_functions=["{tiny["rewards"]}:needs_answer"]', "grpo.samples_per_prompt=2",
                          "grpo.micro_batch_size=2")
        with pytest.raises(RewardError, match=message):
            build_stage(cfg)


def test_a_reward_of_the_wrong_length_names_the_function_and_the_step(tiny, tmp_path):
    cfg = grpo_config(tiny, tmp_path / "out", functions=("one_short",))
    stage = build_stage(cfg)
    with pytest.raises(RewardError, match=r"^reward function '.*my_rewards.py:one_short' returned 7 rewards for 8 "
                                          r"completions; expected exactly one per completion \(step 1\)$"):
        stage.train_step(Trainer(cfg, stage, "cpu"))


def test_sampling_from_a_non_finite_policy_stops_with_one_line_and_the_last_checkpoint(tiny, tmp_path):
    """Step 1 trains and is checkpointed; before step 2 the policy's final norm turns NaN, so its sampling
    probabilities are NaN: a TrainingError naming the step and the checkpoint, as ppo gives."""
    cfg = grpo_config(tiny, tmp_path / "out", "train.save_every=1")
    stage = build_stage(cfg)
    step = stage.train_step

    def poison_then_step(trainer):
        if trainer.step == 1:
            with torch.no_grad():
                stage.model.norm.weight.fill_(float("nan"))
        return step(trainer)

    stage.train_step = poison_then_step
    with pytest.raises(TrainingError) as err:
        Trainer(cfg, stage, "cpu").fit()
    message = str(err.value)
    assert message.startswith("non-finite sampling probabilities") and "\n" not in message, message
    assert "step 2" in message and str(tmp_path / "out" / "checkpoints" / "step-0000001") in message


def test_a_non_finite_reward_model_score_stops_with_one_line(tiny, tmp_path):
    """A reward model whose head turns NaN gives NaN scores: a TrainingError naming the step, as ppo gives,
    not a reward function's None (which would train on with advantage 0)."""
    tiny_reward_model_dir(tmp_path / "rm", tiny["tok"])
    cfg = grpo_config(tiny, tmp_path / "out", f"grpo.reward_model={tmp_path / 'rm'}", "grpo.reward_weights=[1.0, 1.0]")
    stage = build_stage(cfg)
    with torch.no_grad():
        for p in stage.scorer.reward_model.head.parameters():
            p.fill_(float("nan"))
    with pytest.raises(TrainingError) as err:
        stage.train_step(Trainer(cfg, stage, "cpu"))
    message = str(err.value)
    assert message.startswith("non-finite scores") and "\n" not in message and "step 1" in message, message


def test_the_python_api_refuses_a_stage_without_reward_sources(tiny, tmp_path):
    stage = build_stage(grpo_config(tiny, tmp_path / "out"))
    with pytest.raises(ValueError, match="no reward source"):
        GRPOStage(stage.cfg, stage.model, tiny["tok"], stage.batches.examples, [])


# --------------------------------------------------------------------------------------------------
# end to end


def test_minirlhf_train_grpo_on_arithmetic(tiny, tmp_path):
    """`minirlhf train --stage grpo` from a config file with a relative reward file, on generated arithmetic
    problems: every TRL-named metric is logged, eval scores greedy answers, the policy and samples are saved."""
    make_arithmetic_data(tmp_path, n_train=24, n_eval=8, seed=0)
    (tmp_path / "rewards.py").write_text(REWARDS)
    config = tmp_path / "grpo.toml"
    config.write_text(f"""
[model]
path = "{tiny['policy']}"
[data]
train_files = ["train.jsonl"]
eval_files = ["eval.jsonl"]
cutoff_len = 64
[train]
output_dir = "run"
lr = 1e-2
max_steps = 3
schedule = "constant"
log_every = 1
precision = "fp32"
[grpo]
reward_functions = ["minirlhf.rewards:number_match", "rewards.py:length", "minirlhf.rewards:soft_overlong_penalty"]
reward_weights = [1.0, 0.1, 1.0]
prompts_per_rollout = 2
samples_per_prompt = 4
micro_batch_size = 4
max_new_tokens = 8
beta = 0.04
loss_type = "grpo"
log_samples_every = 1
[grpo.reward_kwargs]
soft_overlong_penalty = {{max_length = 8, cache_length = 4}}
""")
    from minirlhf.commands import train as train_command

    assert train_command.main(["--stage", "grpo", "--config", str(config), "--device", "cpu"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/number_match/mean", "rewards/length/mean",
                "rewards/soft_overlong_penalty/mean",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "kl", "entropy",
                "num_tokens", "grad_norm", "time/step", "tokens_per_s", "time/generate"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    final = rows[-1]
    assert final["step"] == 3 and {"eval/reward", "eval/rewards/number_match/mean"} <= set(final)
    assert 0.0 <= final["eval/rewards/number_match/mean"] <= 1.0
    # and it is the accuracy of greedy answers made again here from the saved policy by another path (the
    # generate command's: chat template, model.generate, 8 prompts in one batch), judged by their last integer.
    # After 3 steps the tiny policy writes no digit (seed 0: "ffffffff" to every prompt), so both are 0 here.
    tok = load_tokenizer(run)
    prompts = read_prompts(tmp_path / "eval.jsonl", tok)
    answers = [a for batch in generate_answers(Transformer.from_pretrained(run), tok, prompts,
                                               Sampling(max_new_tokens=8), progress=False) for a in batch]
    gold = {p.index: int(p.row["answer"]) for p in prompts}
    right = [bool(re.findall(r"-?\d+", a.text)) and int(re.findall(r"-?\d+", a.text)[-1]) == gold[a.index]
             for a in answers]
    assert len(right) == 8 and final["eval/rewards/number_match/mean"] == pytest.approx(sum(right) / 8)
    assert len((run / "samples.jsonl").read_text().splitlines()) == 3 * 4
