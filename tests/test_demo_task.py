"""The demo task: the gold judge on hand-scored answers, and the generated data sets.

Every expected reward below is worked out by hand from the formula in minirlhf/demo/task.py:
S = sum of sentence polarities / max(2, #sentences), P = sum of penalties,
r = clip((S if P == 0 else min(S, 0)) - P, -1, 1).
"""

from __future__ import annotations

import json
import random
import re

import pytest

from minirlhf.demo import (
    build_demo_rows,
    generate_demo_data,
    gold_reward,
    gold_score,
    judge,
    task,
    tokenizer_corpus,
)
from minirlhf.demo import data as demo_data

PROMPT = "Write a short review of the coffee."


@pytest.mark.parametrize(
    "response, expected",
    [
        # two positive sentences: S = (1 + 1) / 2, no penalty
        ("The coffee was great. I loved it.", 1.0),
        # one positive sentence: S = 1 / max(2, 1)
        ("The coffee was great.", 0.5),
        # neutral adjective only
        ("The coffee was okay.", 0.0),
        ("The coffee was awful.", -0.5),
        ("The coffee was awful. I hated it.", -1.0),
        # "not" flips the next sentiment word: +1, then (+1) + (-1) = 0
        ("The coffee was not awful.", 0.5),
        ("The coffee was great. I would not recommend it.", 0.0),
        # case and "!" do not matter
        ("THE COFFEE WAS GREAT!", 0.5),
        # praise stuffed into one sentence still gives that sentence polarity +1 only
        ("The coffee was great and excellent and lovely.", 0.5),
        # topic never named, another one named: min(1, 0) - 0.5 - 0.25
        ("The hotel was great. I loved it.", -0.75),
        # topic never named: min(1, 0) - 0.5
        ("It was great. I loved it.", -0.5),
        # three sentences: S = 3/3 = 1, one extra sentence: 0 - 0.5
        ("The coffee was great. I loved it. It was lovely.", -0.5),
        # the same word three times: S = 1/2, two repeats: min(0.5, 0) - 2 * 0.25
        ("The coffee was great great great.", -0.5),
        # 18 words (3 + 6 adverbs + 5 adjectives + 4 "and"), 2 beyond MAX_WORDS = 16: 0 - 2 * 0.1
        (
            (
                "The coffee was very really quite rather fairly truly great and excellent and lovely "
                "and superb and good."
            ),
            -0.2,
        ),
        # second sentence a one-word fragment: 0 - 0.25
        ("The coffee was good. Lovely!", -0.25),
        # no final full stop: 0 - 0.25
        ("The coffee was great", -0.25),
        # echoing the prompt: 5 of its 7 words (write, a, short, review, of) are not answer words
        (PROMPT, -5 / 7),
        # "gr8 ##": word "gr" plus junk tokens "8" and "##": 3 unknown of 6 tokens
        ("The coffee was gr8 ##.", -0.5),
        # repetition and a missing stop pile up; clipped at -1
        ("great great great great", -1.0),
        ("", -1.0),
        ("  ... !", -1.0),
    ],
)
def test_gold_reward_hand_scored(response: str, expected: float) -> None:
    assert gold_reward(PROMPT, response) == pytest.approx(expected, abs=1e-12)


def test_positive_beats_neutral_beats_negative() -> None:
    pos = gold_reward(PROMPT, "I found the coffee really delightful.")
    neu = gold_reward(PROMPT, "I found the coffee really ordinary.")
    neg = gold_reward(PROMPT, "I found the coffee really dreadful.")
    assert pos > neu > neg


def test_judgement_breakdown() -> None:
    j = judge("How was the tea?", "The tea was great great. The bus was okay. It was fine")
    # sentences: [the tea was great great], [the bus was okay], [it was fine] (unterminated)
    assert (j.topic, j.sentences, j.words) == ("tea", 3, 12)
    assert j.sentiment == pytest.approx(1 / 3)
    assert j.on_topic and j.off_topic_penalty == 0
    assert j.other_topic_penalty == task.OTHER_TOPIC_PENALTY
    assert j.length_penalty == task.EXTRA_SENTENCE_PENALTY
    assert j.repeat_penalty == task.REPEAT_PENALTY
    assert j.unterminated_penalty == task.UNTERMINATED_PENALTY
    assert j.unknown_penalty == pytest.approx(1 / 12)  # "fine" is not an answer word
    # min(1/3, 0) - (0.25 + 0.5 + 0.25 + 0.25 + 1/12) is below -1
    assert j.reward == -1.0


def test_prompt_topic_errors() -> None:
    assert task.prompt_topic("What did you think of the KETTLE?") == "kettle"
    with pytest.raises(ValueError, match="exactly one topic"):
        gold_reward("Review the thing.", "The thing was great.")
    with pytest.raises(ValueError, match=r"\['coffee', 'tea'\]"):
        gold_reward("Compare the tea and the coffee.", "The tea was great.")


def test_gold_score() -> None:
    prompts = ["Review the tea.", "Review the sofa."]
    assert gold_score(prompts, ["The tea was great.", "The sofa was awful. I hated it."]) == pytest.approx(
        (0.5 - 1.0) / 2
    )
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_score(prompts, ["x"])
    with pytest.raises(ValueError, match="no prompts"):
        gold_score([], [])


def test_lexicon_is_consistent() -> None:
    classes = [
        task.TOPICS, task.POSITIVE_ADJECTIVES, task.NEGATIVE_ADJECTIVES, task.NEUTRAL_ADJECTIVES,
        task.POSITIVE_VERBS, task.NEGATIVE_VERBS, task.NEUTRAL_VERBS, task.ADVERBS, task.ASPECTS,
        tuple(task.FUNCTION_WORDS), tuple(task.FRAME_WORDS), (task.RECOMMEND,),
    ]  # fmt: skip
    words = [w for c in classes for w in c]
    assert len(words) == len(set(words)), "a word sits in two lexicon classes"
    assert all(w.isalpha() and w.islower() for w in words)
    # every prompt names exactly its topic
    for topic in task.TOPICS:
        for t in range(len(task.PROMPT_TEMPLATES)):
            assert task.prompt_topic(task.make_prompt(topic, t)) == topic


def test_grammar_answers_are_clean_and_scored_by_stance() -> None:
    rng = random.Random(0)
    expected_sign = {"positive": 1, "negative": -1, "neutral": 0, "mixed": 0}
    for _ in range(400):
        topic, stance = rng.choice(task.TOPICS), rng.choice(task.STANCES)
        prompt = task.make_prompt(topic, rng.randrange(len(task.PROMPT_TEMPLATES)))
        answer = task.sample_response(rng, topic, stance)
        j = judge(prompt, answer)
        assert j.sentences in (1, 2) and j.words <= task.MAX_WORDS, answer
        assert j.reward == j.sentiment, f"penalised well-formed answer {answer!r}: {j}"
        assert (j.reward > 0) - (j.reward < 0) == expected_sign[stance], (stance, answer)
        if stance in ("positive", "negative"):
            assert abs(j.reward) in (0.5, 1.0)


def test_corruptions_score_below_zero() -> None:
    rng = random.Random(1)
    for kind in task.CORRUPTIONS:
        for _ in range(50):
            prompt = task.make_prompt(rng.choice(task.TOPICS), 0)
            bad = task.sample_corruption(rng, prompt, kind)
            assert -1.0 <= gold_reward(prompt, bad) < 0, (kind, bad)
    with pytest.raises(ValueError, match="unknown corruption"):
        task.sample_corruption(rng, PROMPT, "shout")


def test_junk_scores_the_floor_and_junk_tokens_cancel_the_praise() -> None:
    rng = random.Random(2)
    # random characters never spell the topic (penalty 0.5) and are mostly junk tokens (unknown share >= 0.5),
    # cut into short fragments: P >= 1 and r = clip(min(S, 0) - P) = -1, whatever praise words they hold
    alphabet = "abcdefgh .!?,0123456789" + "".join(task.POSITIVE_ADJECTIVES[:3])
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert gold_reward(PROMPT, text) == -1.0, text
    # a clean positive answer of n words with k junk tokens ("#") after its first word: the only penalty is the
    # unknown share k / (n + k), and with a penalty the praise stops counting (min(S, 0) = 0): r = -k / (n + k)
    for _ in range(100):
        first, rest = task.sample_response(rng, "coffee", "positive").split(" ", 1)
        n, k = 1 + len(re.findall(r"[a-z]+", rest.lower())), rng.randint(1, 3)
        junky = " ".join([first, *["#"] * k, rest])
        assert gold_reward(PROMPT, junky) == pytest.approx(-k / (n + k), abs=1e-12), junky


def test_documents_are_longer_than_answers() -> None:
    rng = random.Random(3)
    named_again = 0
    for _ in range(100):
        topic = rng.choice(task.TOPICS)
        doc = task.sample_document(rng, topic)
        j = judge(task.make_prompt(topic, 1), doc)
        assert 3 <= j.sentences <= 6 and j.on_topic
        assert j.unknown_penalty == j.fragment_penalty == 0
        # only the topic may come back, as later sentences name it again
        mentions = re.findall(r"[a-z]+", doc.lower()).count(topic)
        assert j.repeat_penalty == task.REPEAT_PENALTY * (mentions - 1)
        named_again += mentions > 1
    assert 50 < named_again < 100  # 1 - 0.6**(n-1) for n in 3..6 sentences: 0.64 .. 0.92


# ------------------------------------------------------------------------------------------------
# generated files

SMALL = {"pt": 50, "sft": 60, "preference": 70, "kto": 80, "ppo": 90, "eval": 100}


def _read(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_files_have_loader_fields(tmp_path) -> None:
    paths = generate_demo_data(tmp_path, seed=0, sizes=SMALL)
    assert {k: p.name for k, p in paths.items()} == dict(demo_data.FILE_NAMES)
    rows = {k: _read(p) for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == SMALL
    fields = {
        "pt": {"text": str},
        "sft": {"instruction": str, "input": str, "output": str},
        "preference": {"prompt": str, "chosen": str, "rejected": str},
        "kto": {"prompt": str, "completion": str, "label": bool},
        "ppo": {"prompt": str},
        "eval": {"prompt": str},
    }
    for key, schema in fields.items():
        for row in rows[key]:
            assert set(row) == set(schema), (key, row)
            assert all(isinstance(row[f], t) for f, t in schema.items()), (key, row)
            assert all(row[f] != "" for f, t in schema.items() if t is str and f != "input"), (key, row)
    assert all(r["input"] == "" for r in rows["sft"])


def test_deterministic_by_seed(tmp_path) -> None:
    a = generate_demo_data(tmp_path / "a", seed=7, sizes=SMALL)
    b = generate_demo_data(tmp_path / "b", seed=7, sizes=SMALL)
    c = generate_demo_data(tmp_path / "c", seed=8, sizes=SMALL)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
        assert a[key].read_bytes() != c[key].read_bytes(), key
    # each file has its own stream: resizing one leaves the others unchanged
    d = build_demo_rows(seed=7, sizes={**SMALL, "pt": 5})
    assert d["sft"] == _read(a["sft"]) and d["preference"] == _read(a["preference"])
    assert d["pt"] == _read(a["pt"])[:5]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown size key 'dpo'"):
        build_demo_rows(sizes={"dpo": 10})
    with pytest.raises(ValueError, match=r"sizes\['sft'\] must be an int >= 0"):
        build_demo_rows(sizes={"sft": -1})
    with pytest.raises(ValueError, match="label_noise"):
        build_demo_rows(label_noise=0.7)


def test_ppo_and_eval_prompts_are_held_out() -> None:
    rows = build_demo_rows(seed=0, sizes=SMALL)
    split = demo_data.split_prompts(seed=0)
    train = {r["instruction"] for r in rows["sft"]} | {r["prompt"] for r in rows["preference"] + rows["kto"]}
    ppo, evals = {r["prompt"] for r in rows["ppo"]}, {r["prompt"] for r in rows["eval"]}
    assert train <= set(split["train"])
    assert not (train & ppo) and not (train & evals) and not (ppo & evals)
    # 90 ppo rows over the 40 held-out ppo prompts, taken in shuffled rounds: each appears 2 or 3 times
    counts = [r["prompt"] for r in rows["ppo"]].count
    assert ppo == set(split["ppo"]) and all(counts(p) in (2, 3) for p in ppo)
    for topic in task.TOPICS:  # every topic is trained on and evaluated
        assert sum(task.prompt_topic(p) == topic for p in split["train"]) == len(task.PROMPT_TEMPLATES) - 2
        assert sum(task.prompt_topic(p) == topic for p in split["eval"]) == 1


def test_default_sizes_and_sft_scores_near_zero() -> None:
    rows = build_demo_rows(seed=0)
    assert {k: len(v) for k, v in rows.items()} == dict(demo_data.DEFAULT_SIZES)
    golds = [judge(r["instruction"], r["output"]) for r in rows["sft"]]
    assert all(j.reward == j.sentiment for j in golds), "an sft answer carries a penalty"
    mean = sum(j.reward for j in golds) / len(golds)
    # sd of a single sft gold is about 0.46, so the mean of 3000 has sd ~0.0085; 0.05 is ~6 sd
    assert abs(mean) < 0.05
    assert min(j.reward for j in golds) == -1.0 and max(j.reward for j in golds) == 1.0
    kto = [(gold_reward(r["prompt"], r["completion"]) > 0, r["label"]) for r in rows["kto"]]
    assert all(g == label for g, label in kto)
    assert 0.1 < sum(label for _, label in kto) / len(kto) < 0.9


def test_preference_pairs_and_label_noise() -> None:
    sizes = {"preference": 2000}
    clean = build_demo_rows(seed=3, sizes=sizes, label_noise=0.0)["preference"]
    noisy = build_demo_rows(seed=3, sizes=sizes, label_noise=0.1)["preference"]
    for row in clean:
        chosen = judge(row["prompt"], row["chosen"])
        rejected = judge(row["prompt"], row["rejected"])
        assert chosen.reward >= rejected.reward + demo_data.MIN_PAIR_MARGIN, row
        assert chosen.sentences <= task.MAX_SENTENCES and chosen.repeat_penalty == 0, row
    # noise only swaps chosen and rejected of the same pairs
    swapped = 0
    for c, n in zip(clean, noisy):
        assert n["prompt"] == c["prompt"]
        if (n["chosen"], n["rejected"]) == (c["rejected"], c["chosen"]):
            swapped += 1
        else:
            assert n == c
    # Binomial(2000, 0.1): mean 200, sd sqrt(2000 * 0.1 * 0.9) ~ 13.4; allow 4 sd
    assert abs(swapped - 200) < 4 * 13.4


def test_tokenizer_corpus_covers_every_prompt() -> None:
    corpus = tokenizer_corpus(seed=0, sizes=SMALL)
    assert all(isinstance(t, str) and t for t in corpus)
    everything = set(corpus)
    for topic in task.TOPICS:
        for t in range(len(task.PROMPT_TEMPLATES)):
            assert task.make_prompt(topic, t) in everything
    assert len(corpus) == SMALL["pt"] + SMALL["sft"] + len(task.TOPICS) * len(task.PROMPT_TEMPLATES)
