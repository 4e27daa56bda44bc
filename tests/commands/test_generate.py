"""`minirlhf generate`: answers of the real SmolLM2 equal transformers' greedy answers token for token
(batched and left padded on both sides); on tiny models, resuming skips finished rows and refuses files
it did not write, batches go longest prompt first, --samples draws N answers per prompt, finish_reason
tells a stop from a cut, --compile writes the eager run's greedy answers (and resumes either way), and bad
input is a one-line error naming file:line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minirlhf import cli
from minirlhf.commands.generate import generate_answers, read_prompts
from minirlhf.commands.sampling import Sampling
from minirlhf.model import Transformer
from minirlhf.tokenizer import load_tokenizer
from tests.tiny import constant_model_dir, prompt, tiny_model_dir, write_jsonl

REAL = Path("/tmp/real/smollm2")


def generate(*args: str) -> int:
    return cli.main(["generate", *args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("generate")
    tok = tiny_tok
    rows = [{"prompt": " ".join([prompt(i)] * (1 + i % 4)), "id": f"p{i}"} for i in range(9)]
    return {"dir": d, "tok": tok, "model": tiny_model_dir(d / "model", tok),
            "prompts": write_jsonl(d / "prompts.jsonl", rows),
            "never_stops": constant_model_dir(d / "never_stops", tok, stop_logit=-50.0),
            "stops_at_once": constant_model_dir(d / "stops_at_once", tok, stop_logit=50.0)}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_keep_the_input_and_say_how_each_answer_ended(tiny):
    out = tiny["dir"] / "ends.jsonl"
    assert generate("--model", str(tiny["never_stops"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                    "--max-new-tokens", "5") == 0
    rows = read(out)
    assert [r["prompt_index"] for r in rows] == list(range(9))  # in prompt order once complete
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(9)]
    assert all(r["finish_reason"] == "length" and r["tokens"] == 5 and r["answer"] for r in rows)
    out = tiny["dir"] / "stops.jsonl"
    assert generate("--model", str(tiny["stops_at_once"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                    "--max-new-tokens", "5") == 0
    assert all(r["finish_reason"] == "stop" and r["tokens"] == 0 and r["answer"] == "" for r in read(out))


def test_resume_skips_finished_rows_and_completes_the_file(tiny):
    out = tiny["dir"] / "resume.jsonl"
    args = ["--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "2"]
    assert generate(*args) == 0
    full = read(out)
    # an interrupted run: three rows written, a fourth cut mid-line; one kept row marked so that a
    # regenerated row would show
    kept = [dict(r) for r in full[:3]]
    kept[1]["answer"] = "KEPT"
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(full[3])[:20])
    assert generate(*args) == 0
    resumed = read(out)
    assert len(resumed) == len(full) == 9
    assert resumed[1]["answer"] == "KEPT"
    assert [r for i, r in enumerate(resumed) if i != 1] == [r for i, r in enumerate(full) if i != 1]
    assert generate(*args) == 0  # complete: nothing to do, nothing changed
    assert read(out) == resumed


def test_an_output_that_is_not_a_previous_run_is_refused_untouched(tiny, capsys):
    foreign = tiny["dir"] / "foreign.jsonl"
    foreign.write_text('{"mine": 1}\n')
    code = generate("--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(foreign))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a previous run" in err and len(err.splitlines()) == 1
    assert foreign.read_text() == '{"mine": 1}\n'

    out = tiny["dir"] / "other_args.jsonl"
    assert generate("--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                    "--max-new-tokens", "3") == 0
    before = out.read_text()
    capsys.readouterr()
    code = generate("--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                    "--max-new-tokens", "4")
    err = capsys.readouterr().err
    assert code == 2 and "max_new_tokens: 3 there, 4 now" in err
    assert out.read_text() == before


def test_batches_go_longest_prompt_first(tiny):
    prompts = read_prompts(tiny["prompts"], tiny["tok"])
    model = Transformer.from_pretrained(tiny["model"]).eval()
    batches = list(generate_answers(model, tiny["tok"], prompts, Sampling(max_new_tokens=2), batch_size=2,
                                    progress=False))
    lengths = {p.index: len(p.ids) for p in prompts}
    order = [lengths[a.index] for batch in batches for a in batch]
    assert order == sorted(order, reverse=True) and len(set(order)) > 1
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]


def test_samples_per_prompt_are_seeded(tiny):
    outs = [tiny["dir"] / f"samples{k}.jsonl" for k in range(3)]
    for out, seed in zip(outs, ("1", "1", "2")):
        assert generate("--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                        "--samples", "3", "--temperature", "1", "--max-new-tokens", "6", "--seed", seed) == 0
    a, b, c = (read(o) for o in outs)
    assert [(r["prompt_index"], r["sample_index"]) for r in a] == [(i, s) for i in range(9) for s in range(3)]
    assert a == b  # same seed, same answers
    assert [r["answer"] for r in a] != [r["answer"] for r in c]
    assert len({r["answer"] for r in a if r["prompt_index"] == 0}) > 1  # three different samples


def test_compile_writes_the_eager_answers_and_resumes_either_way(tiny):
    from torch._dynamo.utils import counters

    def args(out: Path) -> list[str]:
        # batches of 5 then 4 prompts of another length: the first compile, then the symbolic one
        return ["--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                "--max-new-tokens", "4", "--batch-size", "5", "--dtype", "float32"]

    eager, compiled = tiny["dir"] / "eager.jsonl", tiny["dir"] / "compiled.jsonl"
    torch._dynamo.reset()
    counters.clear()
    assert generate(*args(eager)) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert generate(*args(compiled), "--compile") == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the flag reached model.generate
    assert read(compiled) == read(eager)  # greedy, float32: the same tokens
    # --compile is not among the recorded arguments: a run begun with it completes without it
    compiled.write_text("".join(json.dumps(r) + "\n" for r in read(compiled)[:3]))
    assert generate(*args(compiled)) == 0
    assert read(compiled) == read(eager)


def test_bad_prompts_and_arguments_are_one_line_errors(tiny, capsys):
    bad = tiny["dir"] / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    out = tiny["dir"] / "never.jsonl"
    assert generate("--model", str(tiny["model"]), "--prompts", str(bad), "--out", str(out)) == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err
    missing = write_jsonl(tiny["dir"] / "noprompt.jsonl", [{"prompt": "a"}, {"question": "b"}])
    assert generate("--model", str(tiny["model"]), "--prompts", str(missing), "--out", str(out)) == 2
    assert f"{missing}:2: row has no prompt" in capsys.readouterr().err
    clash = write_jsonl(tiny["dir"] / "clash.jsonl", [{"prompt": "a", "answer": "42"}])
    assert generate("--model", str(tiny["model"]), "--prompts", str(clash), "--out", str(out)) == 2
    assert "--answer-field completion" in capsys.readouterr().err
    assert generate("--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--out", str(out),
                    "--samples", "2") == 2
    assert "--temperature > 0" in capsys.readouterr().err
    assert not out.exists()
    assert generate("--model", str(tiny["dir"]), "--prompts", str(tiny["prompts"]), "--out", str(out)) == 2
    assert "is not a model directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# against transformers, on the real model


def real_prompts(n: int) -> list[str]:
    """n prompts of varied lengths (3 to ~40 tokens), so that left padding matters."""
    topics = ["the sea", "a quiet library", "bread", "the moon", "trains", "a red kite", "winter", "coffee",
              "a old clock", "rivers"]
    forms = ["Hi!", "What is {a} + {b}?", "Write one sentence about {t}.", "Name three things you can do with {t}.",
             "Explain in simple words why {t} matters to people who live far away from cities and towns.",
             "Is {a} larger than {b}? Answer yes or no.", "Give me a title for a story about {t}.",
             "{t}"]
    return [forms[i % len(forms)].format(a=7 * i % 97, b=13 * i % 89, t=topics[i % len(topics)]) for i in range(n)]


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="needs the real SmolLM2 at /tmp/real/smollm2")
def test_real_model_greedy_matches_transformers_token_for_token(tmp_path):
    transformers = pytest.importorskip("transformers")
    n, new, batch = 200, 24, 25
    texts = real_prompts(n)
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in texts])
    out = tmp_path / "answers.jsonl"
    assert generate("--model", str(REAL), "--prompts", str(prompts_file), "--out", str(out), "--max-new-tokens",
                    str(new), "--batch-size", str(batch), "--device", "cpu") == 0
    rows = read(out)

    # the same prompts through transformers: its chat template, left padding, greedy generate, in file order
    hf_tok = transformers.AutoTokenizer.from_pretrained(REAL)
    hf_tok.padding_side = "left"
    hf = transformers.AutoModelForCausalLM.from_pretrained(REAL, dtype=torch.float32).eval()
    tok = load_tokenizer(str(REAL))
    stop = tok.stop_ids
    hf_answers = []
    for start in range(0, n, batch):
        chat = [hf_tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True) for t in texts[start: start + batch]]
        enc = hf_tok(chat, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            seqs = hf.generate(**enc, max_new_tokens=new, do_sample=False, eos_token_id=stop,
                               pad_token_id=tok.pad_id)
        for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            hf_answers.append(row[:cut])

    # ours, token for token: the ids the command decoded (read_prompts + generate_answers are its steps)
    ours = {}
    model = Transformer.from_pretrained(REAL).eval()
    for answers in generate_answers(model, tok, read_prompts(prompts_file, tok), Sampling(max_new_tokens=new),
                                    batch_size=batch, progress=False):
        ours.update((a.index, a.ids) for a in answers)
    mismatched = [i for i in range(n) if ours[i] != hf_answers[i]]
    assert not mismatched, [(i, ours[i], hf_answers[i]) for i in mismatched[:3]]
    for i, row in enumerate(rows):
        ids = hf_answers[i]
        stopped = ids[-1] in stop
        assert row["answer"] == tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        assert row["tokens"] == len(ids) - stopped
        assert row["finish_reason"] == ("stop" if stopped else "length")
