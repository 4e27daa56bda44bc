"""minirlhf.kto: the step against losses.kto_loss on float64 log-probs with mismatched pairs built
here from the prompt/completion parts, the pairing itself (batch sizes 1 to 4), the class-balance
warning, per-class metrics under accumulation, learning, and LoRA's reference = the base model.
"""

import logging

import pytest
import torch
from helpers_tiny import (
    kto_rows,
    logps64,
    tiny_config,
    tiny_model_dir,
    tiny_tokenizer,
    write_jsonl,
)

from minirlhf import kto, losses
from minirlhf.data import IGNORE_INDEX
from minirlhf.model import Transformer
from minirlhf.trainer import Trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("kto")
    tok = tiny_tokenizer(d / "tok")
    model_dir = tiny_model_dir(d / "model", tok)
    # 9 rows: 5 desirable (even i), 4 undesirable: lambda ratio 5/4 inside [1, 4/3], no warning
    train = write_jsonl(d / "train.jsonl", kto_rows(9))
    evalf = write_jsonl(d / "eval.jsonl", kto_rows(7, offset=40))
    return {"dir": d, "tok": tok, "model": model_dir, "train": train, "eval": evalf}


def make_stage(tiny, out, *sets, steps=0, train=None):
    cfg = tiny_config("kto", tiny["model"], train or tiny["train"], tiny["dir"] / out, *sets, eval_file=tiny["eval"])
    stage = kto.build_stage(cfg)
    trainer = Trainer(cfg, stage)
    for _ in range(steps):
        stage.train_step(trainer)
    return stage, trainer


def pad(rows, value):
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def mismatched(examples, pad_id):
    """Prompt i + completion (i + 1) mod B, built from the encoded parts (not from the collator)."""
    ids, labels = [], []
    for i, e in enumerate(examples):
        o = examples[(i + 1) % len(examples)]
        ids.append(e["input_ids"][: e["prompt_len"]] + o["input_ids"][o["prompt_len"]:])
        labels.append([IGNORE_INDEX] * e["prompt_len"] + o["input_ids"][o["prompt_len"]:])
    for row, l in zip(ids, labels):  # the completion's last token (after the end of turn) is untrained
        l[-1] = IGNORE_INDEX
    mask = [[1] * len(r) for r in ids]
    return pad(ids, pad_id), pad(mask, 0), pad(labels, IGNORE_INDEX)


def test_loss_equals_kto_loss_on_float64_logps(tiny):
    stage, _ = make_stage(tiny, "loss", "kto.beta=0.5", "kto.desirable_weight=1.2", "kto.undesirable_weight=0.9",
                          "train.lr=1e-2", steps=2)
    examples = stage.batches.examples[:4]
    batch = stage.collate(examples)
    loss, metrics = stage.loss(batch)

    start = Transformer.from_pretrained(tiny["model"])
    policy, _ = logps64(stage.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref, _ = logps64(start, batch["input_ids"], batch["attention_mask"], batch["labels"])
    kl_batch = mismatched(examples, tiny["tok"].pad_id)
    kl = (logps64(stage.model, *kl_batch)[0] - logps64(start, *kl_batch)[0]).mean()
    desirable = torch.tensor([e["desirable"] for e in examples])
    expected = losses.kto_loss(policy, ref, desirable, kl, beta=0.5, desirable_weight=1.2,
                               undesirable_weight=0.9).mean()
    assert not torch.allclose(policy, ref, atol=1e-3)  # the policy moved
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["kl"].double(), kl, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_kl_pairs_are_mismatched(tiny, B):
    stage, _ = make_stage(tiny, "pairs")
    examples = stage.batches.examples[:B]
    batch = stage.collate(examples)
    for i, e in enumerate(examples):
        o = examples[(i + 1) % B]
        p, q = e["prompt_len"], o["prompt_len"]
        row = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].bool()].tolist()
        assert row == e["input_ids"][:p] + o["input_ids"][q:]
        # B >= 2: a different completion (neighbouring rows differ in topic); B = 1: the example itself
        assert (row[p:] == e["input_ids"][p:]) == (B == 1)


def test_batch_of_one_warns_and_no_trailing_batch_of_one(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="minirlhf.kto"):
        make_stage(tiny, "b1", "train.micro_batch_size=1")
    assert any("micro_batch_size = 1" in r.getMessage() for r in caplog.records)
    stage, _ = make_stage(tiny, "b4")  # 9 rows in batches of 4 would leave a batch of 1: dropped
    sizes = [next(stage.batches)["input_ids"].shape[0] for _ in range(5)]
    assert sizes == [4, 4, 4, 4, 4]
    assert [len(c) for c in stage.eval_chunks()] == [4, 3]
    stage.cfg.train.micro_batch_size = 3  # 7 eval rows: 3, 3, 1 -> the 1 joins the chunk before it
    assert [len(c) for c in stage.eval_chunks()] == [3, 4]


def test_class_balance_warning(tiny, caplog):
    assert kto.check_class_balance(5, 4, 1.0, 1.0) is None  # 1.25
    assert kto.check_class_balance(4, 3, 1.0, 1.0) is None  # 4/3 exactly
    assert kto.check_class_balance(3, 3, 1.0, 1.0) is None  # 1
    # 1 desirable, 3 undesirable: 1 * 1 / (1 * 3) = 1/3; lambda_D in [3, 4] restores [1, 4/3]
    msg = kto.check_class_balance(1, 3, 1.0, 1.0)
    assert "0.333" in msg and "[3, 4]" in msg
    assert "1.500" in kto.check_class_balance(3, 2, 1.0, 1.0)  # 3 / 2 > 4/3
    assert "no undesirable" in kto.check_class_balance(3, 0, 1.0, 1.0)
    skewed = write_jsonl(tiny["dir"] / "skewed.jsonl", kto_rows(8, desirable_every=4))  # 2 vs 6
    with caplog.at_level(logging.WARNING, logger="minirlhf.kto"):
        make_stage(tiny, "skewed", train=skewed)
    assert any("outside [1, 4/3]" in r.getMessage() for r in caplog.records)


def test_class_means_over_accumulated_micro_batches():
    # two micro-batches averaged by the trainer (grad_accum = 2): desirable rewards 1.0 (1 row) and
    # 2.0, 4.0 (2 rows) -> sums 1 and 6, counts 1 and 2 -> averaged 3.5 / 1.5 = 7/3 = mean of (1, 2, 4)
    averaged = {"loss": 0.5, "_count/desirable": 1.5, "_sum/rewards/desirable": 3.5, "_sum/logps/desirable": -6.0,
                "_count/undesirable": 0.0, "_sum/rewards/undesirable": 0.0, "_sum/logps/undesirable": 0.0}
    out = kto.KTOStage.class_means(averaged)
    assert out == {"loss": 0.5, "rewards/desirable": pytest.approx(7 / 3), "logps/desirable": pytest.approx(-4.0)}


def test_steps_raise_held_out_margin(tiny):
    stage, trainer = make_stage(tiny, "learn", "kto.beta=1.0", "train.lr=5e-3")
    before = stage.evaluate(trainer)
    for _ in range(8):
        result = stage.train_step(trainer)
    assert {"rewards/desirable", "rewards/undesirable", "kl", "loss"} <= set(result.metrics)
    after = stage.evaluate(trainer)
    assert before["rewards/margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert after["rewards/margin"] > 1.0 and after["loss"] < before["loss"], (before, after)


def test_lora_reference_is_the_base_model(tiny):
    stage, _ = make_stage(tiny, "lora", "lora.enabled=true", "lora.r=4", "train.lr=1e-2", steps=3)
    batch = stage.collate(stage.batches.examples[:4])
    out = stage.forward(batch)
    base = Transformer.from_pretrained(tiny["model"])
    ref, _ = logps64(base, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(out["ref"].double(), ref, rtol=1e-5, atol=1e-4)
    assert (out["policy"].double() - ref).abs().max() > 1e-2
