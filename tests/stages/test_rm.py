"""minirlhf.stages.rm: the loss against losses.py on float64 scores from transformers, learning, and the saved
reward model: transformers' AutoModelForSequenceClassification and our RewardModel reload it with the
same scores (a head that silently reloads with random weights would fail), also when the tokenizer pads
with its eos token, and its recorded score stats are the mean and std of those scores over the training
pairs. A causal LM becomes a reward model only when a fresh head is asked for.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from minirlhf import losses
from minirlhf.heads import NotARewardModel, RewardModel, export_pad_id
from minirlhf.lora import lora_layers
from minirlhf.stages import rm
from minirlhf.tokenizer import load_tokenizer
from tests.tiny import preference_rows, tiny_stage, write_jsonl

REAL = Path("/tmp/real/smollm2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    """A tiny llama made by transformers (as tests/test_model.py's hf_model), with our tokenizer."""
    d = tmp_path_factory.mktemp("rm")
    tok = tiny_tok
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
    return tiny_stage("rm", tiny, out, *sets)


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
    # 16 training pairs, one per topic: the held-out pairs (other topic-word combinations) then test the
    # sentiment word, not topics never seen (with the fixture's 8 pairs, topics 0-7 only, a held-out pair stayed
    # wrong at model seed 2 and the margin gain fell to +0.89 at seed 4)
    train = write_jsonl(tiny["dir"] / "learn.jsonl", preference_rows(16))
    stage, trainer = tiny_stage("rm", tiny, "learn", "train.lr=3e-3", train_file=train)
    before = stage.evaluate(trainer)
    for _ in range(15):
        stage.train_step(trainer)
    after = stage.evaluate(trainer)
    # measured over model init seeds 0-9 (train.seed 42-51) x threads 1, 2: accuracy 1.0 in every run, each run's
    # smallest held-out pair margin +1.42..+6.04, mean margin gain +4.57..+8.56 (bound 2.0)
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 2.0, (before, after)


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


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = [[pad_id] * (width - len(r)) + r if left else r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def test_export_with_pad_equal_to_eos_scores_the_same_token_in_transformers(tiny, tmp_path):
    """SmolLM2-Instruct's setup: eos = pad = <|im_end|>, the token every scored sequence ends with. transformers
    reads the rightmost token that is not config.pad_token_id, so with that pad it would score the token before
    the end. The export declares another pad (here the unk token) in config.json and the tokenizer files, and
    transformers, padding with the exported tokenizer, then scores what we score, right or left padded."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny["model"] / name, tok_dir / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((tok_dir / name).read_text())
        data.update(eos_token="<|im_end|>", pad_token="<|im_end|>")
        (tok_dir / name).write_text(json.dumps(data))
    stage, _ = make_stage(tiny, "pad-eos", f"model.tokenizer={tok_dir}")
    end = stage.tok.token_to_id("<|im_end|>")
    assert stage.tok.pad_id == stage.tok.eos_id == end
    rows = [e[f"{side}_input_ids"] for e in stage.batches.examples[:4] for side in ("chosen", "rejected")]
    assert all(r[-1] == end for r in rows) and len({len(r) for r in rows}) > 1

    out = tmp_path / "rm"
    stage.save_final(out, stage.model)
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    assert pad == stage.tok.unk_id != end
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == pad  # what TRL pads with
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = RewardModel.from_pretrained(out).eval()
    for left in (False, True):
        ids, mask = padded(rows, pad, left)
        # transformers counts positions from column 0; a left-padded row needs its own (ours counts from the
        # first real token), or the scores would differ for a reason other than the position read
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            expected = ours(ids, mask)
            got = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1e-3
    # the check can fail: declared and padded with the eos (the old export), transformers reads another token
    hf.config.pad_token_id = end
    ids, mask = padded(rows, end, left=False)
    with torch.no_grad():
        moved = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (moved - ours(ids, mask)).abs().max() > 1e-2


@pytest.mark.skipif(not REAL.is_dir(), reason="needs the SmolLM2 checkpoint at /tmp/real/smollm2")
def test_smollm2_reward_models_export_unk_as_pad():
    tok = load_tokenizer(str(REAL))
    assert tok.pad_id == tok.eos_id  # <|im_end|>
    assert export_pad_id(tok) == tok.unk_id == 0  # <|endoftext|>


def test_a_causal_lm_loads_as_a_reward_model_only_with_a_fresh_head(tiny, caplog):
    with pytest.raises(NotARewardModel, match=r"is not a reward model: its config.json names \['LlamaForCausalLM'\]"):
        RewardModel.from_pretrained(tiny["model"])
    with caplog.at_level("INFO", logger="minirlhf.heads"):
        a = RewardModel.from_pretrained(tiny["model"], seed=3, new_head=True)
    assert any("starts fresh" in r.getMessage() for r in caplog.records)
    b = RewardModel.from_pretrained(tiny["model"], seed=3, new_head=True)
    assert torch.equal(a.head.weight, b.head.weight)  # seeded
    assert a.reward_mean is None  # no statistics until the rm stage records them


def test_lm_head_in_lora_targets_is_left_out_of_the_reward_model(tiny):
    """The reward model's backbone has no LM head: [lora] settings that name it adapt the rest."""
    stage, _ = make_stage(tiny, "lm-head", "lora.enabled=true", "lora.r=4", 'lora.target_modules=["q_proj", "lm_head"]')
    assert {n.rpartition(".")[2] for n, _ in lora_layers(stage.model)} == {"q_proj"}
