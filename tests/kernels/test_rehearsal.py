"""A GPU rehearsal on the CPU: every stage for two steps as a GPU run does it by default, float32 weights
under bf16 autocast with the Triton kernels, so dtype and dispatch bugs surface without a GPU.

On a GPU `precision = "auto"` means bf16 autocast over the checkpoint's own dtype (float32 for a fresh or
pt model) and `backend = "auto"` means the Triton kernels. Here `precision = "bf16"` turns CPU autocast on
and `backend = "triton"` runs the kernels in the Triton interpreter (make test-kernels sets
TRITON_INTERPRET=1). The interpreter cannot multiply bf16 tl.dot operands by itself; conftest.py widens
them to float32 exactly as a GPU's tensor cores do (kernel_utils.interpret_bf16_dots_as_float32), so the
kernels run with the bf16 inputs a GPU would give them. The models are tiny and runs two steps long: the
interpreter takes about a second per kernel call.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import minirlhf.kernels as K
from minirlhf.commands import train
from minirlhf.logprobs import causal_lm_loss
from minirlhf.model import Transformer
from tests.kernels.kernel_utils import needs_triton
from tests.tiny import (
    answer,
    kto_rows,
    preference_rows,
    prompt,
    prompt_rows,
    tiny_model_dir,
    tiny_reward_model_dir,
    write_jsonl,
)

pytestmark = needs_triton

STAGE_SETS = {
    "pt": [],
    "sft": [],
    "rm": [],
    "dpo": [],
    "kto": [],
    "ppo": ["ppo.prompts_per_rollout=2", "ppo.samples_per_prompt=2", "ppo.minibatch_size=2",
            "ppo.micro_batch_size=2", "ppo.max_new_tokens=4", "ppo.log_samples_every=0"],
    "grpo": ["grpo.prompts_per_rollout=2", "grpo.samples_per_prompt=2", "grpo.micro_batch_size=2",
             "grpo.max_new_tokens=4", "grpo.log_samples_every=0", "grpo.beta=0.05",
             'grpo.reward_functions=["minirlhf.rewards:number_match"]'],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    """A float32 tiny llama (1 layer) with its tokenizer, a float32 reward model and one data file a stage."""
    root = tmp_path_factory.mktemp("rehearsal")
    tok = tiny_tok
    model = tiny_model_dir(root / "model", tok, num_hidden_layers=1)
    tiny_reward_model_dir(root / "rm", tok, num_hidden_layers=1)
    (root / "pt.txt").write_text("\n\n".join(answer(i, i % 2 == 0) for i in range(4)) + "\n")
    files = {
        "pt": root / "pt.txt",
        "sft": write_jsonl(root / "sft.jsonl", [{"instruction": prompt(i), "output": answer(i, True)}
                                                for i in range(4)]),
        "rm": write_jsonl(root / "pref.jsonl", preference_rows(4)),
        "kto": write_jsonl(root / "kto.jsonl", kto_rows(4)),
        "ppo": write_jsonl(root / "prompts.jsonl", prompt_rows(4)),
        "grpo": write_jsonl(root / "task.jsonl", [{"prompt": prompt(i), "answer": str(i)} for i in range(4)]),
    }
    files["dpo"] = files["rm"]
    return {"root": root, "model": model, "rm": root / "rm", "files": files}


@pytest.fixture
def dispatch_log(monkeypatch):
    """Record the dtypes every Triton kernel call receives from the dispatch in minirlhf.kernels."""
    calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, tuple(a.dtype for a in args[:3] if a.is_floating_point())))
            return fn(*args, **kwargs)
        monkeypatch.setattr(K, name, wrapped)

    for name in ("attention_triton", "linear_cross_entropy_triton", "linear_logprobs_triton"):
        spy(name, getattr(K, name))
    return calls


@pytest.mark.parametrize("stage", list(STAGE_SETS))
def test_stage_runs_under_bf16_autocast_with_triton(tiny, stage, dispatch_log, tmp_path, capsys):
    sets = [f"model.path={json.dumps(str(tiny['model']))}",
            f"data.train_files=[{json.dumps(str(tiny['files'][stage]))}]",
            f"train.output_dir={json.dumps(str(tmp_path / 'out'))}",
            'train.precision="bf16"', 'model.backend="triton"', "train.max_steps=2", "train.micro_batch_size=2",
            "train.log_every=1", "train.warmup_steps=0", "data.cutoff_len=24", "data.shuffle=false"]
    if stage == "pt":
        sets.append("data.block_size=24")
    if stage in ("ppo", "grpo"):  # grpo: the reward model as a second reward source, beside number_match
        sets.append(f"{stage}.reward_model={json.dumps(str(tiny['rm']))}")
    (tmp_path / "cfg.toml").write_text("")
    args = ["--stage", stage, "--config", str(tmp_path / "cfg.toml"), "--device", "cpu"]
    rc = train.main(args + [a for s in sets + STAGE_SETS[stage] for a in ("--set", s)])
    assert rc == 0, capsys.readouterr().err

    ops = {name for name, _ in dispatch_log}
    assert "attention_triton" in ops, "the Triton attention kernel never ran"
    assert ops & {"linear_cross_entropy_triton", "linear_logprobs_triton"} or stage == "rm", \
        "the fused LM-head kernels never ran"
    # attention's q, k, v come in one dtype; the LM head's weight may come in float32 beside bf16 hidden
    # states: its autograd Function casts it (so that dW stays the float32 sum)
    mixed = [(name, dtypes) for name, dtypes in dispatch_log
             if len(set(dtypes)) != 1 and not (name != "attention_triton" and dtypes[1] == torch.float32)]
    assert not mixed, f"a kernel got inputs of different dtypes: {mixed[:3]}"
    # the training passes run under autocast; a pass outside it (rm's score statistics at save) is float32
    assert {dtypes[0] for _, dtypes in dispatch_log} <= {torch.bfloat16, torch.float32}
    assert any(dtypes[0] == torch.bfloat16 for name, dtypes in dispatch_log if name == "attention_triton")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), rows


def test_triton_and_torch_agree_under_bf16_autocast(tiny):
    """One forward and backward of the float32 model under bf16 autocast, Triton against torch (SDPA and
    unfused logits): both compute in bf16, so the loss and gradients agree to bf16 rounding (~2^-8
    relative per op, a few ops deep)."""
    batch = {"input_ids": torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, :5] = 0  # left padding: the document-id path of both backends
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for backend in ("torch", "triton"):
        model = Transformer.from_pretrained(tiny["model"])
        model.kernel_backend = backend
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        results[backend] = (loss.detach(), model.layers[0].self_attn.q_proj.weight.grad)
    assert results["torch"][0].dtype == results["triton"][0].dtype == torch.float32
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-2, atol=0)
    grad, ref = results["triton"][1], results["torch"][1]
    assert (grad - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_dispatch_casts_to_the_autocast_dtype_as_torch_ops_do():
    """Under autocast the kernels take their inputs in the autocast dtype, as torch's SDPA and matmul do
    there: mixed float32 / bf16 attention inputs run (SDPA accepts them under autocast), and the fused
    LM head computes exactly what it computes on bf16 inputs outside autocast, on either backend."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 19, 16, generator=g), torch.randn(2, 2, 19, 16, generator=g)
    v = torch.randn(2, 2, 19, 16, generator=g).bfloat16()
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(45, 16, generator=g)
    labels = torch.randint(0, 45, (37,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = {b: K.attention(q, k, v, backend=b) for b in ("torch", "triton")}
        logps = {b: K.linear_logprobs(hidden, weight, labels, backend=b) for b in ("torch", "triton")}
        ce = {b: K.linear_cross_entropy(hidden, weight, labels, backend=b) for b in ("torch", "triton")}
    assert sdpa.dtype == out["torch"].dtype == out["triton"].dtype == torch.bfloat16
    torch.testing.assert_close(out["torch"], sdpa, rtol=0, atol=0)
    assert (out["triton"].float() - sdpa.float()).abs().max() <= 2e-2 * sdpa.float().abs().max()
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    for backend in ("torch", "triton"):  # outside autocast here
        exact = dict(rtol=0, atol=0)
        torch.testing.assert_close(logps[backend], K.linear_logprobs(h16, w16, labels, backend=backend), **exact)
        torch.testing.assert_close(ce[backend], K.linear_cross_entropy(h16, w16, labels, backend=backend), **exact)
