"""minirlhf.data: formats -> tokens and loss masks, truncation, packing, malformed rows, shuffling, resume.

The tokenizer is a tiny character-level one written here, implementing the contract of
minirlhf.tokenizer (encode, apply_chat_template -> ids + assistant_mask, bos/eos/pad ids), so every
expected token can be written out by hand. Its template is

    BOS, then per message: ROLE_TOKEN, the content's characters, EOT
    (+ ASSISTANT_TOKEN when add_generation_prompt)

with the assistant mask on an assistant turn's characters and its EOT. EOT is also eos and pad
(pad == eos, the case where masking by `ids != pad_id` would lose the final EOT).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from minirlhf.batching import (
    BatchIterator,
    ResumableSampler,
    StratifiedSampler,
    collate_kto,
    collate_preference,
    collate_prompts,
    collate_sft,
    pack_documents,
    pack_examples,
)
from minirlhf.config import DataSection, load_config
from minirlhf.data import (
    build_datasets,
    encode_kto,
    encode_preference,
    encode_prompt,
    encode_sft,
    encode_text,
    split_rows,
)
from minirlhf.data_files import DataError, load_examples, read_all
from minirlhf.losses import IGNORE_INDEX

BOS, EOT = 1, 2
ROLE = {"system": 3, "user": 4, "assistant": 5}
X = IGNORE_INDEX


@dataclass
class ChatEncoding:
    ids: list
    assistant_mask: list


class CharTokenizer:
    vocab_size = 10 + 128
    bos_id, eos_id, pad_id = BOS, EOT, EOT

    def encode(self, text, add_bos=False):
        return ([BOS] if add_bos else []) + [10 + ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        ids, mask = [BOS], [False]
        for m in messages:
            body = [ROLE[m["role"]]] + self.encode(m["content"]) + [EOT]
            ids += body
            mask += [False] + [m["role"] == "assistant"] * (len(body) - 1)
        if add_generation_prompt:
            ids, mask = ids + [ROLE["assistant"]], mask + [False]
        return ChatEncoding(ids, mask)


TOK = CharTokenizer()


def t(text):
    return [10 + ord(c) for c in text]


def data(**kw):
    return DataSection(**kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- formats

def test_alpaca_tokens_and_mask():
    ex = encode_sft({"instruction": "hi", "input": "x", "output": "ok", "system": "S"}, TOK, data())
    ids = [BOS, ROLE["system"], *t("S"), EOT, ROLE["user"], *t("hi\n\nx"), EOT, ROLE["assistant"], *t("ok"), EOT]
    assert ex["input_ids"] == ids
    # only the answer's characters and its closing EOT are trained
    assert ex["labels"] == [X] * (len(ids) - 3) + [*t("ok"), EOT]
    # configurable field names; no input, no system
    ex = encode_sft({"q": "hi", "a": "ok"}, TOK, data(instruction_field="q", output_field="a", format="alpaca"))
    assert ex["input_ids"] == [BOS, ROLE["user"], *t("hi"), EOT, ROLE["assistant"], *t("ok"), EOT]


def test_sharegpt_multi_turn_masks_every_assistant_turn():
    conv = [{"from": "system", "value": "S"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"}, {"from": "gpt", "value": "de"}]
    ex = encode_sft({"conversations": conv}, TOK, data())
    ids = [BOS, 3, *t("S"), EOT, 4, *t("a"), EOT, 5, *t("b"), EOT, 4, *t("c"), EOT, 5, *t("de"), EOT]
    labels = [X, X, X, X, X, X, X, X, *t("b"), EOT, X, X, X, X, *t("de"), EOT]
    assert ex["input_ids"] == ids
    assert ex["labels"] == labels  # token by token: the user and system turns carry -100
    # OpenAI-style messages, and a top-level system column, give the same tokens
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[c["from"]], "content": c["value"]} for c in conv[1:]]
    assert encode_sft({"messages": msgs, "system": "S"}, TOK, data()) == ex


def test_final_eos_trained_with_pad_equal_eos():
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "qqqq", "output": "long"}]
    batch = collate_sft([encode_sft(r, TOK, data()) for r in rows], TOK.pad_id)
    assert TOK.pad_id == TOK.eos_id
    short = [BOS, 4, *t("q"), EOT, 5, *t("a"), EOT]
    pad = len(batch["input_ids"][1]) - len(short)
    assert batch["input_ids"][0].tolist() == short + [EOT] * pad  # padded with pad == eos
    assert batch["attention_mask"][0].tolist() == [1] * len(short) + [0] * pad
    # the answer's EOT is a label; the pads (same id) are not
    assert batch["labels"][0].tolist() == [X] * 5 + [*t("a"), EOT] + [X] * pad
    assert batch["labels"][1, -1].item() == EOT


def test_preference_forms_agree():
    ex = encode_preference({"prompt": "p", "chosen": "good", "rejected": "no"}, TOK, data())
    prompt = [BOS, 4, *t("p"), EOT, 5]
    assert ex["prompt_len"] == len(prompt)
    assert ex["chosen_input_ids"] == prompt + t("good") + [EOT]
    assert ex["chosen_labels"] == [X] * len(prompt) + t("good") + [EOT]
    assert ex["rejected_input_ids"] == prompt + t("no") + [EOT]
    assert ex["rejected_labels"] == [X] * len(prompt) + t("no") + [EOT]
    assert encode_preference({"query": "p", "chosen": "good", "rejected": "no"}, TOK, data()) == ex
    user = {"role": "user", "content": "p"}
    conv = {"chosen": [user, {"role": "assistant", "content": "good"}],
            "rejected": [user, {"role": "assistant", "content": "no"}]}
    assert encode_preference(conv, TOK, data()) == ex
    split = {"prompt": [user], "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "no"}]}
    assert encode_preference(split, TOK, data()) == ex
    # earlier assistant turns in a shared multi-turn prefix are context, not trained
    turns = [user, {"role": "assistant", "content": "r"}, {"role": "user", "content": "s"}]
    ex2 = encode_preference({"chosen": turns + [{"role": "assistant", "content": "y"}],
                             "rejected": turns + [{"role": "assistant", "content": "n"}]}, TOK, data())
    assert ex2["chosen_labels"] == [X] * ex2["prompt_len"] + t("y") + [EOT]
    with pytest.raises(Exception, match="missing field 'prompt' \\(needed unless"):
        encode_preference({"chosen": "good", "rejected": "no"}, TOK, data())
    # margin column for the reward model
    assert encode_preference({"prompt": "p", "chosen": "a", "rejected": "b", "m": 2}, TOK, data(), "m")["margin"] == 2.0


def test_preference_collator_pads_both_sides_to_one_length():
    exs = [encode_preference({"prompt": "p", "chosen": "good", "rejected": "n"}, TOK, data()),
           encode_preference({"prompt": "pp", "chosen": "a", "rejected": "bbbbbb"}, TOK, data())]
    b = collate_preference(exs, TOK.pad_id)
    # one width for both sides: the longest of all four rows, 6 prompt tokens + 6 chars + EOT
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 13)
    assert b["prompt_lens"].tolist() == [5, 6]
    assert b["rejected_labels"][1].tolist() == [X] * 6 + t("bbbbbb") + [EOT]
    assert b["chosen_attention_mask"][1].tolist() == [1] * 8 + [0] * 5


def test_kto_rows_and_kl_pairs():
    a = encode_kto({"prompt": "p", "completion": "yes", "label": True}, TOK, data())
    b = encode_kto({"prompt": "qq", "completion": "n", "label": False}, TOK, data())
    assert a["input_ids"] == [BOS, 4, *t("p"), EOT, 5, *t("yes"), EOT] and a["prompt_len"] == 5
    assert a["labels"] == [X] * 5 + t("yes") + [EOT]
    batch = collate_kto([a, b], TOK.pad_id)
    assert batch["desirable"].tolist() == [True, False]
    # prompt of row 0 with the completion of row 1, and the other way round
    assert batch["kl_input_ids"][0].tolist()[:7] == [BOS, 4, *t("p"), EOT, 5, *t("n"), EOT]
    assert batch["kl_labels"][0].tolist()[:7] == [X] * 5 + t("n") + [EOT]
    assert batch["kl_input_ids"][1].tolist() == [BOS, 4, *t("qq"), EOT, 5, *t("yes"), EOT]
    with pytest.raises(Exception, match="must be true or false, got 1"):
        encode_kto({"prompt": "p", "completion": "c", "label": 1}, TOK, data())


def test_prompts_left_padded_with_generation_prompt():
    a = encode_prompt({"prompt": "hello"}, TOK, data())
    assert a["input_ids"] == [BOS, 4, *t("hello"), EOT, 5]
    b = encode_prompt({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ref"}]},
                      TOK, data())
    assert b["input_ids"] == [BOS, 4, *t("q"), EOT, 5]  # the reference answer is dropped
    batch = collate_prompts([a, b], TOK.pad_id)
    assert batch["input_ids"][1].tolist() == [EOT] * 4 + b["input_ids"]
    assert batch["attention_mask"][1].tolist() == [0] * 4 + [1] * 5
    assert batch["input_ids"][:, -1].tolist() == [5, 5]  # every row ends where generation starts
    # a long prompt keeps BOS and its newest tokens
    c = encode_prompt({"prompt": "abcdefgh"}, TOK, data(cutoff_len=6))
    assert c["input_ids"] == [BOS, *t("fgh"), EOT, 5]


# ----------------------------------------------------------------------------- truncation

def test_truncation_keeps_bos_and_answer_cuts_oldest_prompt_tokens():
    row = {"instruction": "abcdefghij", "output": "xyz"}
    full = encode_sft(row, TOK, data())
    assert len(full["input_ids"]) == 18  # BOS, USER, 10 chars, EOT, ASSISTANT | 3 chars, EOT
    # cutoff 12 = BOS + 11: the answer (3 chars + EOT = 4) + the newest 7 of the 13 prompt tokens
    ex = encode_sft(row, TOK, data(cutoff_len=12))
    assert ex["input_ids"] == [BOS, *t("fghij"), EOT, 5, *t("xyz"), EOT]
    assert ex["labels"] == [X] * 8 + [*t("xyz"), EOT]
    # an answer (11 tokens) longer than the budget (8): the prompt keeps 8 // 2 = 4 tokens, the answer
    # its first 4
    ex = encode_sft({"instruction": "abcdefghij", "output": "0123456789"}, TOK, data(cutoff_len=9))
    assert ex["input_ids"] == [BOS, *t("ij"), EOT, 5, *t("0123")]
    assert ex["labels"] == [X] * 5 + t("0123")
    # preference: both sides keep the same prompt tokens, sized for the longer answer (4 of budget 9)
    ex = encode_preference({"prompt": "abcdef", "chosen": "x", "rejected": "yyy"}, TOK, data(cutoff_len=10))
    assert ex["chosen_input_ids"][:ex["prompt_len"]] == ex["rejected_input_ids"][:ex["prompt_len"]]
    assert ex["rejected_input_ids"] == [BOS, *t("def"), EOT, 5, *t("yyy"), EOT]
    assert ex["chosen_input_ids"] == [BOS, *t("def"), EOT, 5, *t("x"), EOT]


# ----------------------------------------------------------------------------- pt and packing

def test_pt_txt_paragraphs_packed_without_cross_document_labels(tmp_path):
    (tmp_path / "c.txt").write_text("ab\ncd\n\n\nefg\n\nhi\n")
    rows, _ = read_all([str(tmp_path / "c.txt")])
    assert [(line, r) for _, line, r in rows] == [(1, "ab\ncd"), (5, "efg"), (7, "hi")]
    docs = [encode_text(r, TOK, data()) for _, _, r in rows]
    assert docs[0] == t("ab\ncd") + [EOT]
    blocks = pack_documents(docs, block_size=8)
    # stream: [a b \n c d EOT | e f] [g EOT h i EOT]
    assert [b["input_ids"] for b in blocks] == [t("ab\ncd") + [EOT] + t("ef"), t("g") + [EOT] + t("hi") + [EOT]]
    assert blocks[0]["document_ids"] == [0] * 6 + [1, 1]
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert blocks[0]["labels"] == [X, *t("b\ncd"), EOT, X, t("f")[0]]
    assert blocks[1]["document_ids"] == [0, 0, 1, 1, 1]
    assert blocks[1]["position_ids"] == [0, 1, 0, 1, 2]
    assert blocks[1]["labels"] == [X, EOT, X, *t("i"), EOT]
    for b in blocks:  # a trained label at t+1 is always predicted from the same document
        for i in range(len(b["labels"]) - 1):
            if b["labels"][i + 1] != X:
                assert b["document_ids"][i] == b["document_ids"][i + 1]
    batch = collate_sft(blocks, TOK.pad_id)
    assert batch["document_ids"][1].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]  # padding is its own document
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    assert batch["labels"][1].tolist()[5:] == [X] * 3


def test_sft_packing_keeps_whole_examples():
    exs = [encode_sft({"instruction": "a", "output": "b"}, TOK, data()) for _ in range(3)]  # 7 tokens each
    blocks = pack_examples(exs, block_size=17)
    assert [len(b["input_ids"]) for b in blocks] == [14, 7]  # a third example would need 21 > 17
    assert blocks[0]["labels"] == exs[0]["labels"] * 2
    assert blocks[0]["document_ids"] == [0] * 7 + [1] * 7
    assert blocks[0]["position_ids"] == list(range(7)) * 2


# ----------------------------------------------------------------------------- malformed rows

def test_malformed_rows_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        '{"instruction": "a", "output": ',
        {"instruction": "a"},
        {"instruction": "a", "output": 3},
        {"instruction": "a", "output": "  "},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        [1, 2],
        {"instruction": "c", "output": "d"},
    ])
    encode = functools.partial(encode_sft, tok=TOK, data=data())
    expected = [
        f"{path}:2: invalid JSON: Expecting value (column 32)",
        f"{path}:3: missing field 'output' (row has: instruction)",
        f"{path}:4: field 'output' must be a string, got int",
        f"{path}:5: empty answer in field 'output'",
        f"{path}:6: conversations turn 2 has unknown role 'bot' (expected one of user, human, assistant, gpt, system)",
        f"{path}:7: 'conversations' must end with an assistant turn, got user",
        f"{path}:8: row must be a JSON object, got list",
    ]
    with pytest.raises(DataError) as info:
        load_examples([str(path)], encode)
    assert str(info.value) == expected[0]
    examples, skipped = load_examples([str(path)], encode, skip_bad_rows=True)
    assert len(examples) == 2 and skipped == expected
    # U+2028 inside a JSON string is not a line break of the file
    write_jsonl(tmp_path / "u.jsonl", ['{"instruction": "a\u2028b", "output": "c"}', '{"instruction": "d"}'])
    with pytest.raises(DataError, match=r"u\.jsonl:2: missing field 'output'"):
        load_examples([str(tmp_path / "u.jsonl")], encode)
    path.write_text("\n".join(path.read_text().splitlines()[2:]) + "\n")  # no JSON error left
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'output'"):
        load_examples([str(path)], encode)


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a",\n   "chosen": "b"}\n]\n')
    with pytest.raises(DataError) as info:
        load_examples([str(path)], lambda r: encode_preference(r, TOK, data()))
    assert str(info.value) == f"{path}:3: missing field 'rejected' (row has: prompt, chosen)"
    path.write_text('[\n {"a": 1},\n {"a": 2,,}\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON"):
        read_all([str(path)])
    with pytest.raises(DataError, match="data file not found"):
        read_all([str(tmp_path / "missing.jsonl")])


# ----------------------------------------------------------------------------- order, split, resume

def test_shuffling_is_deterministic_and_resumable():
    def take(sampler, n):
        return [next(sampler) for _ in range(n)]

    a, b = ResumableSampler(10, 3, seed=7), ResumableSampler(10, 3, seed=7)
    first = take(a, 8)
    assert first == take(b, 8)
    assert first != take(ResumableSampler(10, 3, seed=8), 8)
    # each epoch is a permutation: 4 batches (3 + 3 + 3 + 1), then the next epoch reshuffles
    assert sorted(i for b in first[:4] for i in b) == list(range(10)) and [len(b) for b in first[:4]] == [3, 3, 3, 1]
    assert sorted(i for b in first[4:8] for i in b) == list(range(10)) and first[4:8] != first[:4]
    assert a.epoch == 1
    # resume mid-epoch and at an epoch boundary
    for cut in (2, 4, 5):
        s = ResumableSampler(10, 3, seed=7)
        take(s, cut)
        state = s.state_dict()
        r = ResumableSampler(10, 3, seed=7)
        r.load_state_dict(state)
        assert take(r, 8 - cut) == first[cut:]
    with pytest.raises(ValueError, match="state is for 10 examples"):
        ResumableSampler(11, 3, seed=7).load_state_dict(state)
    it = BatchIterator([{"input_ids": [i, i], "labels": [i, i]} for i in range(10)], 3,
                       lambda exs: collate_sft(exs, 0), seed=7)
    assert it.batches_per_epoch == 4
    assert next(it)["input_ids"][:, 0].tolist() == first[0]


def test_stratified_batches_hold_each_class_in_its_share():
    # 40 examples, 10 of class True (a quarter), batches of 8: every batch holds 2 of them (8 / 4), each
    # epoch is a permutation, epochs differ, and a resumed sampler continues with the same batches
    strata = [i % 4 == 1 for i in range(40)]
    a = StratifiedSampler(strata, 8, seed=5)
    batches = [next(a) for _ in range(15)]  # three epochs of five
    assert [sum(strata[i] for i in b) for b in batches] == [2] * 15
    for e in range(3):
        assert sorted(i for b in batches[5 * e: 5 * e + 5] for i in b) == list(range(40))
    assert batches[:5] != batches[5:10]
    r = StratifiedSampler(strata, 8, seed=5)
    [next(r) for _ in range(7)]
    resumed = StratifiedSampler(strata, 8, seed=5)
    resumed.load_state_dict(r.state_dict())
    assert [next(resumed) for _ in range(8)] == batches[7:]
    # uneven shares: 3 classes of 7, 11, 22 in batches of 10 -> within one of 1.75, 2.75, 5.5 in every batch
    three = [0] * 7 + [1] * 11 + [2] * 22
    s = StratifiedSampler(three, 10, seed=1)
    for _ in range(8):
        counts = [sum(three[i] == c for i in next(s)) for c in range(3)]
        assert all(abs(n - share) < 1 + 1e-9 for n, share in zip(counts, (1.75, 2.75, 5.5))), counts
    # through BatchIterator; without strata a plain shuffle (whose batches vary: 0 to 4 here)
    it = BatchIterator([{"input_ids": [i], "labels": [i]} for i in range(40)], 8, lambda exs: collate_sft(exs, 0),
                       seed=5, strata=strata)
    assert next(it)["input_ids"][:, 0].tolist() == batches[0]
    plain = ResumableSampler(40, 8, seed=5)
    assert len({sum(strata[i] for i in next(plain)) for _ in range(15)}) > 1


def test_eval_split_deterministic_and_disjoint():
    rows = list(range(20))
    train, held = split_rows(rows, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == rows
    assert split_rows(rows, 0.25, seed=3) == (train, held)
    assert split_rows(rows, 0.25, seed=4) != (train, held)


CHAT = ("alpaca", "sharegpt")  # the formats the sft stage reads: "auto" is the first, which tells the two apart


def test_build_datasets_from_config(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)] + [{"instruction": "bad"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "cfg.toml").write_text('[model]\npath = "m"\n[data]\ntrain_files = ["train.jsonl"]\n'
                                       "eval_split = 0.2\nskip_bad_rows = true\n")
    cfg = load_config(tmp_path / "cfg.toml", [], "sft")
    ds = build_datasets(cfg, TOK, CHAT)
    # round(0.2 * 11 rows) = 2 held out by the seed-42 permutation: rows 6 and 8 (0-based); the bad row
    # (10) fell in the train part and is skipped
    assert (len(ds.train), len(ds.eval)) == (8, 2)
    assert [TOK.decode(e["input_ids"])[:2] for e in ds.eval] == ["q6", "q8"]
    assert ds.skipped == [f"{tmp_path / 'train.jsonl'}:11: missing field 'output' (row has: instruction)"]
    batch = ds.collate(ds.train[:2])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    # tokenizing in worker processes gives the same examples
    cfg2 = load_config(tmp_path / "cfg.toml", ["data.num_workers=2"], "sft")
    assert build_datasets(cfg2, TOK, CHAT).train == ds.train
    # pt from jsonl text, packed
    write_jsonl(tmp_path / "pt.jsonl", [{"text": "abc"}, {"text": "de"}])
    cfg3 = load_config(tmp_path / "cfg.toml", [f"data.train_files=['{tmp_path / 'pt.jsonl'}']", "data.eval_split=0",
                                               "data.block_size=4", "pt.add_bos=true"], "pt")
    pt = build_datasets(cfg3, TOK, ("text",), add_bos=cfg3.pt.add_bos)
    # stream [BOS a b c | EOT BOS d e | EOT]: the 1-token remainder has nothing to predict and is dropped
    assert [b["input_ids"] for b in pt.train] == [[BOS, *t("abc")], [EOT, BOS, *t("de")]]
    assert pt.train[1]["document_ids"] == [0, 1, 1, 1] and pt.train[1]["labels"] == [X, X, *t("de")]


def _config(tmp_path, stage, rows, *sets):
    write_jsonl(tmp_path / "train.jsonl", rows)
    return load_config(None, ["model.path=\"m\"", f"data.train_files=['{tmp_path / 'train.jsonl'}']", *sets], stage)


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_preference_rows_with_identical_answers_are_skipped_with_a_count(tmp_path, caplog, stage):
    # Regression: a pair whose chosen equals rejected trained on as if it meant something (a constant loss,
    # log 2, and zero gradient). Rows 1 and 3 are such ties: row 3 only once truncated to cutoff_len (its
    # answers differ after the 10th character), row 5 differs in its last character and is kept.
    rows = [{"prompt": "p0", "chosen": "good", "rejected": "bad"},
            {"prompt": "p1", "chosen": "same", "rejected": "same"},
            {"prompt": "p2", "chosen": "yes", "rejected": "no"},
            {"prompt": "p3", "chosen": "0123456789-long", "rejected": "0123456789-other"},
            {"prompt": "p4", "chosen": "a", "rejected": "b"},
            {"prompt": "p5", "chosen": "0123456789a", "rejected": "0123456789b"}]
    # BOS + user turn (1 + 2 + 1) + assistant role = 6 prompt tokens; cutoff 17 leaves 11 answer tokens:
    # ten characters and the next one ("-" in both answers of row 3), no end of turn
    cfg = _config(tmp_path, stage, rows, "data.cutoff_len=17")
    with caplog.at_level("WARNING", logger="minirlhf.data"):
        ds = build_datasets(cfg, TOK, ("preference",))
    assert sorted(TOK.decode(e["chosen_input_ids"])[:2] for e in ds.train) == ["p0", "p2", "p4", "p5"]
    assert [r.getMessage() for r in caplog.records if "identical" in r.getMessage()] == [
        "skipped 2 preference rows (train 2, eval 0) whose chosen and rejected answers are identical after "
        "tokenization and truncation to [data] cutoff_len = 17: they state no preference and give no gradient"]


def test_eval_split_that_holds_out_nothing_is_an_error(tmp_path, caplog):
    # Regression: eval_split > 0 on a single row held out round(0.3 * 1) = 0 rows, and the run trained
    # without evaluating and without a word.
    one = [{"instruction": "q", "output": "a"}]
    with pytest.raises(DataError, match=r"\[data\] eval_split = 0.3 holds out no row of the 1 training row"):
        build_datasets(_config(tmp_path, "sft", one, "data.eval_split=0.3"), TOK, CHAT)
    # rows held out but none usable: both eval pairs are ties
    ties = [{"prompt": f"p{i}", "chosen": "x" if i < 4 else "s", "rejected": "y" if i < 4 else "s"}
            for i in range(6)]
    held = split_rows(list(range(6)), 0.34, seed=42)[1]
    ties = [dict(r, chosen="s", rejected="s") if i in held else r for i, r in enumerate(ties)]
    with pytest.raises(DataError, match=r"eval_split = 0.34 holds out 2 row\(s\), none of them usable"):
        build_datasets(_config(tmp_path, "dpo", ties, "data.eval_split=0.34"), TOK, ("preference",))
    # eval_files whose rows are all skipped as malformed
    bad = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "no output"}])
    with pytest.raises(DataError, match=r"eval\.jsonl: no usable evaluation examples in \[data\] eval_files"):
        build_datasets(_config(tmp_path, "sft", one * 3, f"data.eval_files=['{bad}']", "data.skip_bad_rows=true"),
                       TOK, CHAT)
    # no eval asked for, but eval_every set: one warning line, the run goes on
    with caplog.at_level("WARNING", logger="minirlhf.data"):
        ds = build_datasets(_config(tmp_path, "sft", one * 3, "train.eval_every=5"), TOK, CHAT)
    assert len(ds.train) == 3 and ds.eval == []
    assert any("eval_every = 5, but there is no eval data" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- with the real tokenizer

@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A tiny SentencePiece tokenizer (chatml template) from minirlhf.tokenizer, and the same directory
    loaded by Hugging Face transformers as the independent renderer."""
    from transformers import AutoTokenizer

    from minirlhf.tokenizer_training import train_sentencepiece
    out = tmp_path_factory.mktemp("sp")
    texts = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)] + ["how are you?"] * 20
    tok = train_sentencepiece(texts, str(out), vocab_size=360, chat_template="chatml")
    return tok, AutoTokenizer.from_pretrained(str(out))


def trained_spans(ids, labels):
    """The runs of trained tokens: [[ids of run 1], [ids of run 2], ...]."""
    spans, cur = [], []
    for i, label in zip(ids, labels):
        if label != X:
            assert label == i
            cur.append(i)
        elif cur:
            spans, cur = spans + [cur], []
    return spans + ([cur] if cur else [])


def test_real_tokenizer_sft_preference_prompt(sp_tokenizer):
    tok, hf = sp_tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "lazy dog"}]
    conv = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in msgs]
    ex = encode_sft({"conversations": conv}, tok, data())
    assert ex["input_ids"] == hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
    # each assistant reply is trained up to and including its <|im_end|>; nothing else is
    spans = trained_spans(ex["input_ids"], ex["labels"])
    assert [tok.decode(s) for s in spans] == ["the fox<|im_end|>", "lazy dog<|im_end|>"]
    assert spans[-1][-1] == tok.token_to_id("<|im_end|>") and spans[-1][-1] in tok.stop_ids

    pref = encode_preference({"prompt": msgs[:4], "chosen": "lazy dog", "rejected": "quick"}, tok, data())
    # a preference sequence ends at the answer's <|im_end|> (where generation stops and the reward model
    # reads its score): transformers' ids minus the template's trailing newline
    full = hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert tok.decode(full[len(pref["chosen_input_ids"]):]) == "\n"
    assert pref["chosen_input_ids"] == full[:len(pref["chosen_input_ids"])]
    assert pref["chosen_input_ids"][-1] == tok.token_to_id("<|im_end|>")
    assert [tok.decode(s) for s in trained_spans(pref["rejected_input_ids"], pref["rejected_labels"])] == [
        "quick<|im_end|>"]
    assert pref["chosen_input_ids"][:pref["prompt_len"]] == hf.apply_chat_template(
        msgs[:4], tokenize=True, add_generation_prompt=True)["input_ids"]

    # worker processes inherit the tokenizer (its compiled template cannot be pickled)
    rows = [("mem", i, {"prompt": f"how are you {i}", "chosen": "fox", "rejected": "dog"}) for i in range(6)]
    encode = functools.partial(encode_preference, tok=tok, data=data())
    assert load_examples((), encode, num_workers=2, rows=rows) == load_examples((), encode, rows=rows)

    prompt = encode_prompt({"prompt": msgs[:2]}, tok, data())
    assert prompt["input_ids"] == hf.apply_chat_template(msgs[:2], tokenize=True,
                                                         add_generation_prompt=True)["input_ids"]
