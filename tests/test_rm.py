"""minirlhf.rm: the loss against losses.py on float64 scores from transformers, learning, and the saved
reward model: transformers' AutoModelForSequenceClassification and our RewardModel reload it with the
same scores (a head that silently reloads with random weights would fail), and its recorded score stats
are the mean and std of those scores over the training pairs.
"""

import pytest
import torch
import transformers
from helpers_tiny import preference_rows, tiny_config, tiny_tokenizer, write_jsonl

from minirlhf import losses, rm
from minirlhf.heads import RewardModel
from minirlhf.trainer import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama made by transformers (as tests/test_model.py's hf_model), with our tokenizer."""
    d = tmp_path_factory.mktemp("rm")
    tok = tiny_tokenizer(d / "tok")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                   pad_token_id=tok.pad_id)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # randomise the constant-initialised norms too
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(d / "model")
    tok.save_pretrained(str(d / "model"))
    train = write_jsonl(d / "train.jsonl", preference_rows(8))
    evalf = write_jsonl(d / "eval.jsonl", preference_rows(6, offset=40))
    return {"dir": d, "tok": tok, "model": d / "model", "train": train, "eval": evalf}


def make_stage(tiny, out, *sets):
    cfg = tiny_config("rm", tiny["model"], tiny["train"], tiny["dir"] / out, *sets, eval_file=tiny["eval"])
    stage = rm.build_stage(cfg)
    return stage, Trainer(cfg, stage)


def hf_scores(model, batch, side):
    with torch.no_grad():
        out = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"])
    return out.logits[:, 0]


@pytest.mark.parametrize("kind", ["log_sig", "log_exp"])
def test_loss_equals_losses_py_on_float64_scores(tiny, kind):
    stage, _ = make_stage(tiny, f"loss-{kind}", f'rm.loss="{kind}"', 'rm.margin_field="score"',
                          "rm.center_rewards_coef=0.1")
    batch = stage.collate(stage.batches.examples[:4])
    loss, metrics = stage.loss(batch)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1)
    with torch.no_grad():
        hf.score.weight.copy_(stage.model.head.weight)
    hf = hf.double().eval()
    c, r = hf_scores(hf, batch, "chosen"), hf_scores(hf, batch, "rejected")
    margin = torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64)  # the rows' "score": 1 + i % 3
    assert batch["margin"].double().equal(margin)
    expected = losses.reward_pair_loss(c, r, kind=kind, margin=margin) + 0.1 * ((c + r) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["margin"].double(), (c - r).mean(), rtol=1e-4, atol=1e-5)
    assert float(metrics["accuracy"]) == float((c > r).double().mean())


def test_steps_raise_accuracy_above_chance(tiny):
    stage, trainer = make_stage(tiny, "learn", "train.lr=3e-3")
    before = stage.evaluate(trainer)
    for _ in range(15):
        stage.train_step(trainer)
    after = stage.evaluate(trainer)
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 1.0, (before, after)


@pytest.mark.parametrize("lora", [False, True])
def test_saved_reward_model_reloads_with_the_same_scores(tiny, lora):
    out = tiny["dir"] / f"saved-lora{lora}"
    sets = ["train.max_steps=3", "train.lr=1e-2"] + (["lora.enabled=true", "lora.r=4"] if lora else [])
    stage, trainer = make_stage(tiny, out.name, *sets)
    head_at_start = stage.model.head.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(stage.model.head.weight, head_at_start)  # the head trained (with LoRA too)

    examples = stage.batches.examples
    batch = stage.collate(examples)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    ours = RewardModel.from_pretrained(out).eval()
    with torch.no_grad():
        in_memory = rm.pair_scores(stage.model.eval(), batch)
        reloaded = rm.pair_scores(ours, batch)
    hc, hr = hf_scores(hf, batch, "chosen"), hf_scores(hf, batch, "rejected")
    for a, b, c in zip(in_memory, reloaded, (hc, hr)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    assert hc.std() > 1e-3  # scores that vary, so equality means something

    # the recorded stats are the mean and std of the scores of both answers of every training pair
    scores = torch.cat([hc, hr]).double()
    assert ours.reward_mean == pytest.approx(float(scores.mean()), abs=1e-4)
    assert ours.reward_std == pytest.approx(float(scores.std()), rel=1e-4)

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    q_saved = hf.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_saved, base.model.layers[0].self_attn.q_proj.weight)  # adapters merged in
