"""`minirlhf eval`: bootstrap intervals against hand-derived and normal-theory values; reward-model means
and win rates against every answer scored alone; reward-function accuracy and pass@1 (None skipped);
perplexity and KL against float64 recomputations; answers read from a `minirlhf generate` file; the
report's JSON and table; --compile's report equal to the eager one's; and the one-line errors (a
vocabulary mismatch, a causal LM as reward model, an output file that is not a report).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.commands.generate import generate_answers, read_prompts
from minirlhf.commands.measures import per_prompt, win_scores
from minirlhf.commands.report import bootstrap_interval
from minirlhf.commands.sampling import Sampling
from minirlhf.heads import RewardModel
from minirlhf.losses import IGNORE_INDEX
from minirlhf.model import Transformer
from minirlhf.tokenizer_training import train_sentencepiece
from tests.tiny import constant_model_dir, prompt, prompt_rows, tiny_model_dir, write_jsonl

REWARD_FUNCTIONS = '''
def starts_with_answer(prompts, completions, answer, **fields):
    return [1.0 if c.startswith(a) else 0.0 for c, a in zip(completions, answer)]


def contains_letter(prompts, completions, letter, **fields):
    return [1.0 if l in c else 0.0 for c, l in zip(completions, letter)]


def even_rows_only(prompts, completions, row, **fields):
    return [None if r % 2 else 1.0 for r in row]
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("eval")
    tok = tiny_tok
    rm = RewardModel.from_pretrained(tiny_model_dir(d / "rm_base", tok, seed=7), seed=3, new_head=True)
    rm.save_pretrained(d / "rm", tokenizer=tok)
    return {"dir": d, "tok": tok, "policy": tiny_model_dir(d / "policy", tok, seed=1),
            "baseline": tiny_model_dir(d / "baseline", tok, seed=2), "rm": d / "rm",
            "constant": constant_model_dir(d / "constant", tok, stop_logit=-50.0),
            "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": prompt(i), "row": i} for i in range(12)])}


def run_eval(tmp: Path, *args: str) -> dict:
    out = tmp / "report.json"
    assert cli.main(["eval", *args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    return {m["name"]: m for m in report["metrics"]}


# --------------------------------------------------------------------------------------------------
# the statistics


def test_bootstrap_interval_against_hand_derived_and_normal_theory_values():
    # two values 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th percentile is 0 and the 97.5th is 1
    assert bootstrap_interval([0.0, 1.0], 4000, seed=0) == (0.0, 1.0)
    assert bootstrap_interval([0.3] * 10, 100, seed=0) == pytest.approx((0.3, 0.3))
    assert bootstrap_interval([1.0], 100, seed=0) == (None, None) and bootstrap_interval([0.0, 1.0], 0, 0)[0] is None
    # many normal values: the interval is mean +- 1.96 s / sqrt(n) (normal theory) within sampling error
    values = torch.randn(400, generator=torch.Generator().manual_seed(0)).tolist()
    low, high = bootstrap_interval(values, 4000, seed=1)
    mean, se = sum(values) / 400, torch.tensor(values).std().item() / 20
    assert low == pytest.approx(mean - 1.96 * se, abs=0.15 * se) and high == pytest.approx(mean + 1.96 * se,
                                                                                            abs=0.15 * se)
    assert bootstrap_interval(values, 1000, seed=5) == bootstrap_interval(values, 1000, seed=5)  # seeded


def test_win_scores_count_ties_half_and_samples_stay_with_their_prompt():
    a = {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 2.0, (1, 1): 2.0}
    b = {(0, 0): 0.5, (0, 1): 0.5, (1, 0): 2.0, (1, 1): 3.0}
    wins = win_scores(a, b)
    assert wins == {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.5, (1, 1): 0.0}
    assert per_prompt(wins) == [0.5, 0.25]
    assert per_prompt({(0, 0): None, (1, 0): 1.0, (1, 1): None}) == [1.0]


# --------------------------------------------------------------------------------------------------
# reward model


def scored_alone(model_dir: Path, tok, rm_dir: Path, prompts_file: Path, new: int) -> list[float]:
    """Each prompt answered greedily alone (no batch, no padding) and scored alone: prompt + answer ids."""
    model, rm = Transformer.from_pretrained(model_dir).eval(), RewardModel.from_pretrained(rm_dir).eval()
    scores = []
    for p in read_prompts(prompts_file, tok):
        ids = torch.tensor([p.ids])
        out = model.generate(ids, max_new_tokens=new, temperature=0.0, eos_token_id=tok.stop_ids)
        answer = out.tokens[0][out.mask[0]].tolist()
        with torch.no_grad():
            scores.append(float(rm(torch.tensor([p.ids + answer]))[0]))
    return scores


def test_reward_model_mean_and_win_rate_equal_answers_scored_alone(tiny, tmp_path):
    m = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--baseline", str(tiny["baseline"]),
                 "--reward-model", str(tiny["rm"]), "--prompts", str(tiny["prompts"]), "--max-new-tokens", "6",
                 "--batch-size", "5")
    a = scored_alone(tiny["policy"], tiny["tok"], tiny["rm"], tiny["prompts"], 6)
    b = scored_alone(tiny["baseline"], tiny["tok"], tiny["rm"], tiny["prompts"], 6)
    assert m["greedy/reward"]["value"] == pytest.approx(sum(a) / 12, abs=1e-5)
    assert m["greedy/baseline_reward"]["value"] == pytest.approx(sum(b) / 12, abs=1e-5)
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    win = m["greedy/win_rate"]
    assert win["value"] == pytest.approx(sum(wins) / 12) and win["n"] == 12
    assert win["low"] <= win["value"] <= win["high"]
    assert m["greedy/reward"]["low"] < m["greedy/reward"]["value"] < m["greedy/reward"]["high"]

    same = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--baseline", str(tiny["policy"]), "--reward-model",
                    str(tiny["rm"]), "--prompts", str(tiny["prompts"]), "--max-new-tokens", "6", "--samples", "2")
    for kind in ("greedy", "sampled"):  # against itself every answer ties (same seed, same samples)
        assert same[f"{kind}/win_rate"]["value"] == 0.5
        assert same[f"{kind}/reward"]["value"] == same[f"{kind}/baseline_reward"]["value"]


def test_a_reward_model_of_another_vocabulary_or_a_causal_lm_is_refused(tiny, tmp_path, capsys):
    texts = [prompt(i) + " Something else entirely." for i in range(40)]
    other_tok = train_sentencepiece(texts, str(tmp_path / "other_tok"), vocab_size=320, chat_template="chatml",
                                    num_threads=1)
    other = RewardModel.from_pretrained(tiny_model_dir(tmp_path / "other_base", other_tok), seed=0, new_head=True)
    other.save_pretrained(tmp_path / "other_rm", tokenizer=other_tok)
    base = ["eval", "--policy", str(tiny["policy"]), "--prompts", str(tiny["prompts"]), "--max-new-tokens", "2"]
    assert cli.main([*base, "--reward-model", str(tmp_path / "other_rm")]) == 2
    err = capsys.readouterr().err.strip()
    assert "vocabulary mismatch" in err and len(err.splitlines()) == 1
    assert cli.main([*base, "--reward-model", str(tiny["baseline"])]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    assert cli.main([*base, "--reward-model", str(tiny["dir"])]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    report = tmp_path / "taken.json"
    report.write_text("{}")
    assert cli.main([*base, "--reward-model", str(tiny["rm"]), "--out", str(report)]) == 2
    assert "is not a report" in capsys.readouterr().err and report.read_text() == "{}"


# --------------------------------------------------------------------------------------------------
# reward functions


def test_reward_function_accuracy_and_pass_at_1(tiny, tmp_path):
    fns = tmp_path / "fns.py"
    fns.write_text(REWARD_FUNCTIONS)
    model = Transformer.from_pretrained(tiny["constant"]).eval()
    tok = tiny["tok"]
    greedy_text = next(generate_answers(model, tok, read_prompts(tiny["prompts"], tok)[:1],
                                        Sampling(max_new_tokens=5), progress=False))[0].text
    # the constant model answers every prompt with the same text: rows 0, 3, 6, 9 expect it
    rows = [{"prompt": prompt(i), "row": i, "answer": greedy_text[:3] if i % 3 == 0 else "zzz",
             "letter": "ea"[i % 2]} for i in range(12)]
    tasks = write_jsonl(tmp_path / "tasks.jsonl", rows)
    m = run_eval(tmp_path, "--policy", str(tiny["constant"]), "--prompts", str(tasks), "--max-new-tokens", "5",
                 "--reward-functions", f"{fns}:starts_with_answer", f"{fns}:even_rows_only", f"{fns}:contains_letter",
                 "--samples", "4", "--batch-size", "7")
    assert m["greedy/starts_with_answer"]["value"] == pytest.approx(4 / 12)
    assert m["greedy/even_rows_only"]["value"] == 1.0 and m["greedy/even_rows_only"]["n"] == 6  # None skipped
    # pass@1: the mean over each prompt's 4 samples (the same draws: seed, order and batches as eval's)
    sampled = {}
    for batch in generate_answers(model, tok, read_prompts(tasks, tok), Sampling(temperature=1.0, max_new_tokens=5),
                                  samples=4, batch_size=7, progress=False):
        sampled.update(((a.index, a.sample), a.text) for a in batch)
    hits = [sum(rows[i]["letter"] in sampled[(i, s)] for s in range(4)) / 4 for i in range(12)]
    assert 0 < sum(hits) / 12 < 1 and len(set(hits)) > 1
    assert m["sampled/contains_letter"]["value"] == pytest.approx(sum(hits) / 12)

    # the same from a `minirlhf generate` file: its answers, its settings
    answers = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--model", str(tiny["constant"]), "--prompts", str(tasks), "--out", str(answers),
                     "--max-new-tokens", "5", "--answer-field", "completion"]) == 0
    from_file = run_eval(tmp_path, "--policy", str(answers), "--reward-functions", f"{fns}:starts_with_answer")
    assert from_file["greedy/starts_with_answer"]["value"] == pytest.approx(4 / 12)


# --------------------------------------------------------------------------------------------------
# perplexity and KL, against float64


def nll64(model: Transformer, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """-sum log p(label_t | ids_<t) over labelled positions, in float64 on plain logits."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids]))[0, :-1], -1)
    pairs = [(t, y) for t, y in enumerate(labels[1:]) if y != IGNORE_INDEX]
    return -sum(float(logp[t, y]) for t, y in pairs), len(pairs)


def test_perplexity_of_text_and_chat_files_against_float64(tiny, tmp_path):
    tok = tiny["tok"]
    model = Transformer.from_pretrained(tiny["policy"]).eval()
    docs = ["The kettle was good.", " ".join(prompt(i) for i in range(40)), "Review the lamp. The lamp was poor."]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    total, count = 0.0, 0
    for doc in docs:
        ids = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
        for start in range(0, len(ids) - 1, 128):  # windows of the model's 128 positions
            window = ids[start: start + 128]
            s, n = nll64(model, window, window)
            total, count = total + s, count + n
    assert count > 130  # the long document spans two windows
    m = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--perplexity", str(text))
    assert m["perplexity"]["value"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert m["perplexity"]["n"] == 3 and m["perplexity"]["low"] < m["perplexity"]["value"] < m["perplexity"]["high"]

    conversations = [[{"role": "user", "content": prompt(i)}, {"role": "assistant", "content": f"It was {w}."}]
                     for i, w in enumerate(("good", "bad", "fine"))]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    total, count = 0.0, 0
    for c in conversations:
        enc = tok.apply_chat_template(c)
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(enc.ids, enc.assistant_mask)]
        s, n = nll64(model, enc.ids, labels)
        total, count = total + s, count + n
    m = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--perplexity", str(chat))
    assert m["perplexity"]["value"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_kl_from_reference_against_float64(tiny, tmp_path):
    tok = tiny["tok"]
    args = ["--prompts", str(tiny["prompts"]), "--max-new-tokens", "5", "--batch-size", "4", "--no-greedy"]
    itself = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--reference", str(tiny["policy"]), *args)
    assert itself["sampled/kl_from_reference"]["value"] == pytest.approx(0.0, abs=1e-5)

    m = run_eval(tmp_path, "--policy", str(tiny["policy"]), "--reference", str(tiny["baseline"]), "--samples", "2",
                 *args)
    policy, reference = (Transformer.from_pretrained(tiny[k]).eval() for k in ("policy", "baseline"))
    prompts = read_prompts(tiny["prompts"], tok)
    kls = {}
    for batch in generate_answers(policy, tok, prompts, Sampling(temperature=1.0, max_new_tokens=5), samples=2,
                                  batch_size=4, progress=False):
        for a in batch:
            ids = prompts[a.index].ids + a.ids
            labels = [IGNORE_INDEX] * len(prompts[a.index].ids) + a.ids
            kls.setdefault(a.index, []).append(nll64(reference, ids, labels)[0] - nll64(policy, ids, labels)[0])
    expected = sum(sum(v) / len(v) for v in kls.values()) / len(kls)
    assert m["sampled/kl_from_reference"]["value"] == pytest.approx(expected, abs=1e-4)
    assert m["sampled/kl_from_reference"]["n"] == 12


def test_report_json_and_markdown_table(tiny, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", "--policy", str(tiny["policy"]), "--reward-model", str(tiny["rm"]), "--prompts",
            str(tiny["prompts"]), "--max-new-tokens", "3", "--bootstrap", "200", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| metric | value | 95% interval | n | what |" in printed and "| greedy/reward |" in printed
    assert "200 resamples, seed 0" in printed
    report = json.loads(out.read_text())
    assert report["command"] == "minirlhf eval" and report["settings"]["bootstrap_resamples"] == 200
    assert {"name", "value", "low", "high", "n", "description"} <= set(report["metrics"][0])
    assert cli.main(args) == 0  # a report of an earlier run is replaced


def test_compile_gives_the_eager_report(tiny, tmp_path):
    from torch._dynamo.utils import counters

    args = ["--policy", str(tiny["policy"]), "--reward-model", str(tiny["rm"]), "--prompts", str(tiny["prompts"]),
            "--max-new-tokens", "3", "--dtype", "float32", "--bootstrap", "50"]
    torch._dynamo.reset()
    counters.clear()
    eager = run_eval(tmp_path, *args)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = run_eval(tmp_path, *args, "--compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the flag reached model.generate
    assert compiled == eager  # greedy float32 answers, so the same scores


def test_compile_reaches_a_baseline_model_beside_an_answer_file(tiny, tmp_path, monkeypatch):
    # the answer file's settings replace the flags' decoding settings, --compile stays
    answers = tmp_path / "policy_answers.jsonl"
    assert cli.main(["generate", "--model", str(tiny["policy"]), "--prompts", str(tiny["prompts"]), "--out",
                     str(answers), "--max-new-tokens", "2"]) == 0
    calls = []
    eager_generate = Transformer.generate

    def recording_generate(self, *args, **kwargs):
        calls.append(kwargs["compile"])
        return eager_generate(self, *args, **{**kwargs, "compile": False})

    monkeypatch.setattr(Transformer, "generate", recording_generate)
    run_eval(tmp_path, "--policy", str(answers), "--baseline", str(tiny["baseline"]), "--reward-model",
             str(tiny["rm"]), "--compile")
    assert calls and all(calls)


def test_the_demo_judge_is_a_reward_function():
    from minirlhf.demo.evaluate import gold
    from minirlhf.demo.task import gold_reward

    prompts = ["What did you think of the coffee?"] * 2
    answers = [" I loved the coffee. It was great. ", "bad"]
    assert gold(prompts, answers, row=[0, 1]) == [gold_reward(p, a.strip()) for p, a in zip(prompts, answers)]


def test_answer_files_pair_with_models_on_the_same_prompts(tiny, tmp_path, capsys):
    answers = tmp_path / "policy_answers.jsonl"
    assert cli.main(["generate", "--model", str(tiny["policy"]), "--prompts", str(tiny["prompts"]), "--out",
                     str(answers), "--max-new-tokens", "4"]) == 0
    m = run_eval(tmp_path, "--policy", str(answers), "--baseline", str(tiny["baseline"]), "--reward-model",
                 str(tiny["rm"]), "--prompts", str(tiny["prompts"]))
    assert m["greedy/win_rate"]["n"] == 12 and m["greedy/length"]["value"] == 4  # the file's own 4 tokens
    direct = run_eval(tmp_path, "--policy", str(tiny["baseline"]), "--reward-model", str(tiny["rm"]), "--prompts",
                      str(tiny["prompts"]), "--max-new-tokens", "4")
    assert m["greedy/baseline_reward"]["value"] == pytest.approx(direct["greedy/reward"]["value"], abs=1e-6)

    other = write_jsonl(tmp_path / "other_prompts.jsonl", prompt_rows(3))
    assert cli.main(["eval", "--policy", str(answers), "--baseline", str(tiny["baseline"]), "--reward-model",
                     str(tiny["rm"]), "--prompts", str(other)]) == 2
    assert "answers another prompts file" in capsys.readouterr().err
