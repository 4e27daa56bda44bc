"""[train] disable_dropout (default true) for the stages that compare the trained model with itself or with a
reference: ppo (ratio pi / pi_old, value clip around the rollout's values), dpo and kto (log-ratios to the
reference), and rm, as TRL's RewardConfig. With [lora] dropout = 0.1 the rollout / reference is measured
without dropout while the update ran with it, so before any update PPO's ratio was not 1 and repeated
DPO/KTO losses of one batch differed.

Every test first moves the adapters' B away from its zero start: with B = 0 the adapter adds nothing, so its
input dropout would change nothing and the tests could not fail.
"""

from __future__ import annotations

import pytest
import torch

from minirlhf.lora import lora_layers
from minirlhf.stages import dpo, kto, ppo, rm
from minirlhf.stages.rollout import response_logprobs, response_values
from minirlhf.trainer import Trainer
from tests.tiny import (
    kto_rows,
    preference_rows,
    prompt_rows,
    tiny_config,
    tiny_model_dir,
    tiny_reward_model_dir,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("dropout")
    tok = tiny_tok
    policy = tiny_model_dir(root / "policy", tok, seed=0)
    rm = tiny_reward_model_dir(root / "rm", tok)
    return {"root": root, "policy": policy, "rm": rm,
            "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(8)),
            "pairs": write_jsonl(root / "pairs.jsonl", preference_rows(8)),
            "kto": write_jsonl(root / "kto.jsonl", kto_rows(8))}


def move_adapters(*models: torch.nn.Module) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for model in models:
            for _, layer in lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.5)


def ppo_stage(tiny, out, *sets):
    cfg = tiny_config("ppo", tiny["policy"], tiny["prompts"], out, f"ppo.reward_model={tiny['rm']}",
                      "ppo.prompts_per_rollout=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                      "ppo.micro_batch_size=2", "ppo.max_new_tokens=6", "ppo.log_samples_every=0",
                      "lora.enabled=true", "lora.r=4", "lora.dropout=0.1", *sets)
    stage = ppo.build_stage(cfg)
    move_adapters(stage.policy, stage.critic)
    return cfg, stage


def first_minibatch_in_train_mode(stage: ppo.PPOStage, trainer: Trainer):
    """The rollout, and the policy log-probs and critic values the first update computes (train mode, with
    gradient, the rollout's own micro-batches)."""
    torch.manual_seed(0)
    rollout, _ = stage.experience(trainer.to_device(next(stage.batches)), trainer)
    stage.model.train()
    logprobs, values = [], []
    for rows in torch.arange(rollout.size).split(stage.cfg.ppo.micro_batch_size):
        args = (rollout.input_ids[rows], rollout.attention_mask[rows], rollout.response_mask[rows], rollout.prompt_len)
        lp, _ = response_logprobs(stage.policy, *args, stage.cfg.ppo.temperature)
        logprobs.append(lp.detach())
        values.append(response_values(stage.critic, *args).detach())
    return rollout, torch.cat(logprobs), torch.cat(values)


def test_first_ppo_minibatch_has_ratio_exactly_one_with_lora_dropout(tiny, tmp_path):
    cfg, stage = ppo_stage(tiny, tmp_path / "out", "ppo.ppo_epochs=1")
    trainer = Trainer(cfg, stage, "cpu")
    rollout, logprobs, values = first_minibatch_in_train_mode(stage, trainer)
    mask = rollout.response_mask
    assert torch.equal(logprobs[mask], rollout.logprobs[mask])  # ratio exp(0) = 1 on every token
    assert torch.equal(values[mask], rollout.values[mask])  # the value clip is centred on the update's values
    # the update itself: one minibatch = the whole rollout; its metrics are taken before the optimizer step
    stage.compute_advantages(rollout, stage.kl_ctl.value)
    metrics = stage.ppo_epochs(rollout, trainer)
    assert metrics["updates"] == 1.0
    assert metrics["policy_clipfrac"] == 0.0 and metrics["value_clipfrac"] == 0.0 and metrics["approx_kl"] == 0.0


def test_ppo_keeps_dropout_when_asked(tiny, tmp_path):
    """disable_dropout = false: the old behaviour (dropout in the update only) is still there to choose."""
    cfg, stage = ppo_stage(tiny, tmp_path / "out", "train.disable_dropout=false")
    rollout, logprobs, _ = first_minibatch_in_train_mode(stage, Trainer(cfg, stage, "cpu"))
    mask = rollout.response_mask
    # measured: max |log ratio| 0.29-0.45 at dropout 0.1 (seeds 0-2, 1 and 2 threads); 1e-2 leaves a wide margin
    assert (logprobs[mask] - rollout.logprobs[mask]).abs().max() > 1e-2


@pytest.mark.parametrize("stage_name", ["dpo", "kto", "rm"])
@pytest.mark.parametrize("disable", [True, False])
def test_repeated_losses_in_train_mode_are_identical(tiny, tmp_path, stage_name, disable):
    """Four evaluations of one batch's loss in train mode: identical without dropout; with
    disable_dropout = false they differ (dropout still draws a new mask each time). rm follows TRL's
    RewardConfig (disable_dropout = True) too."""
    data = tiny["kto"] if stage_name == "kto" else tiny["pairs"]
    cfg = tiny_config(stage_name, tiny["policy"], data, tmp_path / "out", "lora.enabled=true", "lora.r=4",
                      "lora.dropout=0.1", *([] if disable else ["train.disable_dropout=false"]),  # true: the default
                      *(['dpo.reference="live"'] if stage_name == "dpo" else []))
    stage = {"dpo": dpo, "kto": kto, "rm": rm}[stage_name].build_stage(cfg)
    move_adapters(stage.model)
    stage.model.train()
    batch = stage.collate(stage.batches.examples[:4])
    with torch.no_grad():
        losses = [float(stage.loss(batch)[0]) for _ in range(4)]
    if disable:
        assert len(set(losses)) == 1, losses
    else:
        assert len(set(losses)) == 4, losses  # four dropout masks, four losses
