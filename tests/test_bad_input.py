"""Bad files, as a careless or hostile user would give them, through the real command line.

Every case runs `minirlhf train` (commands.train.main; one in a `python -m minirlhf` process) and must exit with code 2
and one line on stderr that names the file at fault and what is wrong with it: no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirlhf.commands import train
from minirlhf.model import Transformer
from tests.tiny import (
    answer,
    preference_rows,
    prompt,
    prompt_rows,
    tiny_model_config,
    tiny_model_dir,
    tiny_reward_model_dir,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tok):
    """A working tiny model directory (llama, SentencePiece tokenizer), a reward model and data files."""
    root = tmp_path_factory.mktemp("bad_input")
    tok = tiny_tok
    rm = tiny_reward_model_dir(root / "rm", tok)
    return {
        "root": root, "tok": tok, "model": tiny_model_dir(root / "model", tok), "rm": rm,
        "sft": write_jsonl(root / "sft.jsonl", [{"instruction": prompt(i), "output": answer(i, True)}
                                                for i in range(4)]),
        "pref": write_jsonl(root / "pref.jsonl", preference_rows(4)),
        "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(4)),
    }


@dataclass
class Run:
    """What to run: a stage on a model directory and a data file, plus --set overrides."""
    model: Path
    data: Path
    stage: str = "sft"
    sets: list[str] = field(default_factory=list)


def cli_args(run: Run, out: Path) -> list[str]:
    sets = [f"model.path={json.dumps(str(run.model))}", f"data.train_files=[{json.dumps(str(run.data))}]",
            f"train.output_dir={json.dumps(str(out))}", "train.max_steps=1", "train.micro_batch_size=2",
            'train.precision="fp32"', *run.sets]
    (out.parent / "empty.toml").write_text("")
    return ["--stage", run.stage, "--config", str(out.parent / "empty.toml"), "--device", "cpu",
            *[a for s in sets for a in ("--set", s)]]


def one_line_error(run: Run, tmp_path: Path, capsys) -> str:
    """Run the CLI; assert exit code 2 and a single 'error: ...' line on stderr; return that line."""
    rc = train.main(cli_args(run, tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("error: "), err
    return err


def copy_model(good, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(good["model"], tmp_path / name))


def drop_sentencepiece(model: Path) -> None:
    """Leave tokenizer.json as the tokenizer (load_tokenizer prefers tokenizer.model)."""
    (model / "tokenizer.model").unlink()


def write_tiny_gpt2(path: Path, tok, n_positions: int) -> Path:
    torch.manual_seed(0)
    Transformer(tiny_model_config(tok, model_type="gpt2", num_key_value_heads=4,
                                  max_position_embeddings=n_positions)).save_pretrained(path)
    tok.save_pretrained(str(path))
    return path


# -- model weights -------------------------------------------------------------------------------


def test_truncated_safetensors(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(weights) in err and "not a readable safetensors file" in err


def test_corrupt_safetensors_header(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    header = b'{"not": json'
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "model.safetensors") in err and "invalid JSON in header" in err


def test_truncated_reward_model(good, tmp_path, capsys):
    rm = Path(shutil.copytree(good["rm"], tmp_path / "rm"))
    weights = rm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    sets = [f"ppo.reward_model={json.dumps(str(rm))}", "ppo.prompts_per_rollout=2", "ppo.minibatch_size=2",
            "ppo.micro_batch_size=2", "ppo.max_new_tokens=3"]
    err = one_line_error(Run(good["model"], good["prompts"], "ppo", sets), tmp_path, capsys)
    assert str(weights) in err and "not a readable safetensors file" in err


def test_unreadable_weights_file(good, tmp_path, capsys, monkeypatch):
    """A weights file the process may not open. Tests run as root here, where chmod 000 does not stop a
    read, so the OS's answer is given to the reader directly."""
    from minirlhf import hf_checkpoint

    model = copy_model(good, tmp_path)

    def denied(file, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(hf_checkpoint, "safe_open", denied)
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "model.safetensors") in err and "Permission denied" in err


def test_weights_path_is_a_folder(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "model.safetensors") in err and "not a readable safetensors file" in err


def test_safetensors_tensor_of_the_wrong_shape(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, model / "model.safetensors")
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "model.safetensors") in err and "'model.norm.weight' has shape (7,)" in err


def test_pickled_weights_are_refused_unread(good, tmp_path, capsys):
    """A pytorch_model.bin whose unpickling would run code (touch a file): refused, and never opened."""
    model = copy_model(good, tmp_path)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Payload()}))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "pytorch_model.bin") in err and "safetensors" in err and "never loaded" in err
    assert not marker.exists()


# -- config.json ---------------------------------------------------------------------------------


def test_config_json_invalid(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    (model / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'config.json'}:2: invalid JSON" in err


def test_config_json_missing_hidden_size(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "config.json") in err and "missing key 'hidden_size'" in err


def test_config_json_size_of_the_wrong_type(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["num_attention_heads"] = "4"
    (model / "config.json").write_text(json.dumps(config))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert str(model / "config.json") in err and "num_attention_heads must be a positive integer, got '4'" in err


def test_gpt2_sequence_longer_than_its_position_table(good, tmp_path, capsys):
    """GPT-2 learns one embedding per position (n_positions of them): a longer row would index past the
    table. Refused before training, naming both keys."""
    model = write_tiny_gpt2(tmp_path / "gpt2", good["tok"], n_positions=16)
    err = one_line_error(Run(model, good["sft"], sets=["data.cutoff_len=64"]), tmp_path, capsys)
    assert "[data] cutoff_len = 64" in err and f"{model / 'config.json'} n_positions = 16" in err


def test_gpt2_within_its_position_table_trains(good, tmp_path):
    """The check above refuses only what does not fit: cutoff_len == n_positions runs."""
    model = write_tiny_gpt2(tmp_path / "gpt2", good["tok"], n_positions=32)
    assert train.main(cli_args(Run(model, good["sft"], sets=["data.cutoff_len=32"]), tmp_path / "out")) == 0


@pytest.mark.parametrize("name,content,says", [
    ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
    ("config.json", b'{"model_type": "llama\xff"}', "config.json: not UTF-8 text"),
    ("model.safetensors.index.json", "{}", "model.safetensors.index.json: no 'weight_map' object"),
    ("model.safetensors.index.json", '{"weight_map": ', "model.safetensors.index.json:1: invalid JSON"),
    ("generation_config.json", '{"eos_token_id": 2,}', "generation_config.json:1: invalid JSON"),
    ("special_tokens_map.json", '["</s>"]', "special_tokens_map.json: expected a JSON object, got list"),
])
def test_damaged_files_of_a_model_directory(good, tmp_path, capsys, name, content, says):
    model = copy_model(good, tmp_path)
    target = model / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model}/{says}" in err


def test_integer_tensor_where_a_weight_belongs(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(weights, model / "model.safetensors")
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'model.safetensors'}: tensor 'model.norm.weight' holds torch.int32 values" in err


# -- tokenizer files -----------------------------------------------------------------------------


def test_no_tokenizer_files(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        (model / name).unlink()
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"TokenizerError: {model}: no tokenizer.model, tokenizer.json" in err


def test_corrupt_sentencepiece_model(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    spm = model / "tokenizer.model"
    spm.write_bytes(spm.read_bytes()[:300])
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{spm}: not a readable SentencePiece model" in err


def test_truncated_tokenizer_json(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    drop_sentencepiece(model)
    text = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(text[: len(text) // 2])
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'tokenizer.json'}:1: invalid JSON" in err


def test_tokenizer_json_of_an_unknown_model_type(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    drop_sentencepiece(model)
    data = json.loads((model / "tokenizer.json").read_text())
    data["model"]["type"] = "WordPiece"
    (model / "tokenizer.json").write_text(json.dumps(data))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'tokenizer.json'}: model.type is 'WordPiece'" in err


def test_bad_vocab_and_merges(good, tmp_path, capsys):
    """GPT-2's vocab.json + merges.txt: a merges line that is not a pair, then a vocab.json that is not JSON."""
    model = copy_model(good, tmp_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        (model / name).unlink()
    (model / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (model / "merges.txt").write_text("#version: 0.2\na b\na b c\n")
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'merges.txt'}:3: expected 'left right'" in err
    (model / "vocab.json").write_text('{"a": 0,')
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'vocab.json'}:1: invalid JSON" in err


def test_eos_token_not_in_the_vocabulary(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|no such token|>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model}: eos_token '<|no such token|>' is not in the vocabulary" in err


def test_tokenizer_config_invalid_json(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    (model / "tokenizer_config.json").write_text('{\n  "eos_token": "</s>"\n  "bos_token": "<s>"\n}')
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'tokenizer_config.json'}:3: invalid JSON" in err


# -- chat templates ------------------------------------------------------------------------------


def test_missing_chat_template_file(good, tmp_path, capsys):
    missing = tmp_path / "nope.jinja"
    err = one_line_error(Run(good["model"], good["sft"], sets=[f"data.chat_template={json.dumps(str(missing))}"]),
                         tmp_path, capsys)
    assert f"chat template file '{missing}' does not exist" in err


def test_chat_template_with_a_syntax_error(good, tmp_path, capsys):
    model = copy_model(good, tmp_path)
    (model / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'chat_template.jinja'}: chat template line 2" in err


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # reaching Python internals
    "{% for m in messages %}{{ messages.append(m) }}{% endfor %}",  # mutating the arguments (immutable sandbox)
])
def test_chat_template_breaking_the_sandbox(good, tmp_path, capsys, template):
    model = copy_model(good, tmp_path)
    (model / "chat_template.jinja").write_text(template)
    err = one_line_error(Run(model, good["sft"]), tmp_path, capsys)
    assert f"{model / 'chat_template.jinja'}: the chat template breaks the Jinja sandbox" in err
    inline = [f"data.chat_template={json.dumps(template)}"]
    err = one_line_error(Run(good["model"], good["sft"], sets=inline), tmp_path, capsys)
    assert "[data] chat_template: the chat template breaks the Jinja sandbox" in err


def test_a_row_the_chat_template_refuses_is_named_by_file_and_line(good, tmp_path, capsys):
    # the llama2 template raises when roles do not alternate: row 2 has two user turns in a row
    turns = [{"role": "user", "content": prompt(0)}, {"role": "assistant", "content": answer(0, True)}]
    rows = [{"messages": turns}, {"messages": [turns[0], *turns]}, {"messages": turns}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    err = one_line_error(Run(good["model"], data, sets=['data.chat_template="llama2"']), tmp_path, capsys)
    assert f"{data}:2: built-in chat template 'llama2': chat template: llama2 template: after an optional " in err


# -- data files ----------------------------------------------------------------------------------


def test_data_file_that_is_not_utf8(good, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    rows = [{"instruction": prompt(i), "output": answer(i, True)} for i in range(3)]
    rows[1]["output"] = "The café was good."
    data.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("latin-1"))
    err = one_line_error(Run(good["model"], data), tmp_path, capsys)
    assert f"{data}:2: not UTF-8 text: byte 0xe9" in err


def test_text_file_that_is_not_utf8(good, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes("The kettle was good.\n\nThe café was lovely.\n".encode("latin-1"))
    err = one_line_error(Run(good["model"], data, "pt"), tmp_path, capsys)
    assert f"{data}:3: not UTF-8 text: byte 0xe9 at column 8" in err


def test_empty_data_file(good, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    err = one_line_error(Run(good["model"], data), tmp_path, capsys)
    assert f"{data}: no training examples" in err


# -- the real process ----------------------------------------------------------------------------


def test_the_command_process_exits_2_with_one_line(good, tmp_path):
    """The `minirlhf train` process itself (python -m minirlhf): exit status 2 and one stderr line, on a
    truncated weights file."""
    model = copy_model(good, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = cli_args(Run(model, good["sft"]), tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "minirlhf", "train", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: CheckpointError: {weights}: not a readable safetensors")
