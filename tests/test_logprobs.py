"""The chunked LM-head cross-entropy / log-probs (the torch path of minirlhf.kernels, what CPU runs use)
against the unchunked computation: full logits, then log-softmax, on the same model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import minirlhf.kernels.fused_cross_entropy as xent
from minirlhf.kernels.fused_cross_entropy import linear_cross_entropy_chunked, linear_logprobs_chunked
from minirlhf.logprobs import causal_lm_loss, head_entropy, head_logprobs, label_logprobs
from minirlhf.lora import LoRAConfig, inject_lora
from minirlhf.losses import IGNORE_INDEX, lm_loss, token_logps
from minirlhf.model import ModelConfig, Transformer
from tests.kernels.kernel_utils import rel_err

REL = 1e-5  # the bound; float32 chunked vs unchunked measure ~1e-7 on these shapes
V = 97  # odd sizes everywhere: B, T, V, H and the chunk size do not divide one another


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """7-token chunks, so every batch below spans several chunks and ends in a partial one."""
    monkeypatch.setattr(xent, "cpu_chunk_size", lambda n_tokens, vocab_size, *_: 7)


def tiny_model(seed: int = 0, tied: bool = False) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Transformer(config)
    model.kernel_backend = "torch"
    return model


def make_batch(seed: int = 1, B: int = 3, T: int = 13) -> dict[str, torch.Tensor]:
    """Left-padded rows, prompt tokens and pads labelled IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 4:6] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def unchunked_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, T-1, V)
    return lm_loss(logits, batch["labels"][:, 1:], ignore_index=IGNORE_INDEX)


def assert_same_loss_and_grads(model, chunked_fn, plain_fn):
    model.zero_grad()
    chunked = chunked_fn()
    chunked.backward()
    g_chunked = grads(model)
    model.zero_grad()
    plain = plain_fn()
    plain.backward()
    g_plain = grads(model)
    assert rel_err(chunked.detach(), plain.detach()) <= REL
    assert g_chunked.keys() == g_plain.keys() and g_plain
    for name in g_plain:
        assert rel_err(g_chunked[name], g_plain[name]) <= REL, name


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_matches_unchunked(tied):
    model = tiny_model(tied=tied)
    batch = make_batch()
    assert_same_loss_and_grads(model, lambda: causal_lm_loss(model, batch), lambda: unchunked_loss(model, batch))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_label_logprobs_match_unchunked(temperature):
    model = tiny_model(seed=2)
    batch = make_batch(seed=3, B=2, T=11)
    upstream = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))  # a different gradient per token

    def plain():
        logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
        return (token_logps(logits, batch["labels"][:, 1:], IGNORE_INDEX, temperature) * upstream).sum()

    assert_same_loss_and_grads(model, lambda: (label_logprobs(model, batch, temperature) * upstream).sum(), plain)
    logps = label_logprobs(model, batch, temperature)
    assert (logps[batch["labels"][:, 1:] == IGNORE_INDEX] == 0).all()


def test_lora_adapted_head_matches_unchunked():
    """A LoRA-adapted head is fused as W + s B A; the adapters' gradients must equal those through the
    plain LoRALinear forward (B starts at zero, so give it values first)."""
    model = tiny_model(seed=5)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = make_batch(seed=6)
    assert_same_loss_and_grads(model, lambda: causal_lm_loss(model, batch), lambda: unchunked_loss(model, batch))
    assert any("lm_head.lora_A" in n for n in grads(model))


def test_head_logprobs_with_frozen_head():
    """A frozen head (LoRA elsewhere): no dW is formed, the hidden-state gradient still matches."""
    model = tiny_model(seed=7)
    hidden = torch.randn(2, 9, 24, requires_grad=True)
    labels = torch.randint(0, V, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    model.lm_head.weight.requires_grad_(False)
    chunked = head_logprobs(model, hidden, labels, temperature=1.3)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    plain = token_logps(model.lm_head(hidden), labels, IGNORE_INDEX, temperature=1.3)
    (g_plain,) = torch.autograd.grad(plain.sum(), hidden)
    assert rel_err(chunked, plain) <= REL and rel_err(g_chunked, g_plain) <= REL


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_kernel_matches_float64(reduction):
    """The op itself against float64 F.cross_entropy on the full logits, gradients included."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(23, 19, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, 19, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (23,), generator=g)
    labels[::4] = IGNORE_INDEX
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    loss = linear_cross_entropy_chunked(hidden, weight, labels, IGNORE_INDEX, reduction)
    ref = F.cross_entropy(h64 @ w64.T, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (loss * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    assert rel_err(loss, ref.detach()) <= REL
    assert rel_err(hidden.grad, h64.grad) <= REL and rel_err(weight.grad, w64.grad) <= REL


def test_chunked_logprobs_float64_in_float64_out():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(10, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(V, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (10,), generator=g)
    got = linear_logprobs_chunked(hidden, weight, labels, temperature=0.5)
    want = torch.log_softmax(hidden @ weight.T / 0.5, -1).gather(-1, labels[:, None])[:, 0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_matches_unchunked_autocast():
    """Under CPU autocast the head's matmul runs in bf16 on both paths; the float32 softmax after it
    keeps the two within bf16 rounding of the logits (measured ~1e-3 on the loss here)."""
    model = tiny_model(seed=10)
    batch = make_batch(seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = causal_lm_loss(model, batch)
        plain = unchunked_loss(model, batch)
    assert chunked.dtype == torch.float32
    assert rel_err(chunked.detach(), plain.detach()) <= 1e-2


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_never_materialises_full_logits():
    """Forward and backward of the loss create no tensor as large as the [B, T-1, V] logits."""
    model = tiny_model(seed=12)
    batch = make_batch(seed=13, B=4, T=16)
    full = 4 * 15 * V
    with LargestTensor() as watch:
        causal_lm_loss(model, batch).backward()
    assert watch.numel < full, (watch.numel, full)
    with LargestTensor() as watch:
        unchunked_loss(model, batch).backward()
    assert watch.numel >= full  # the watcher does see the unchunked logits


@pytest.mark.parametrize("chunk", [None, 5])
def test_head_entropy_matches_the_full_logits(chunk):
    """The rollout's entropy diagnostic, a chunk of masked positions at a time, against softmax entropy of
    the full logits in float64 (H = -sum p log p), 0 where the mask is False."""
    model = tiny_model(seed=3)
    batch = make_batch(seed=4)
    mask = batch["labels"] != IGNORE_INDEX  # [B, T]: 29 positions of 39, so chunk 5 ends in a partial one
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, H]
        logp = torch.log_softmax(model.lm_head(hidden).double() / 0.7, dim=-1)
    expected = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
    actual = head_entropy(model, hidden, mask, temperature=0.7, chunk=chunk)
    assert actual.dtype == torch.float32 and actual.shape == mask.shape
    assert (actual[~mask] == 0).all()
    assert rel_err(actual, expected) < REL


class HeadRows(TorchDispatchMode):
    """Records the rows of every matmul against the [V, H] head weight (first dimension of its output)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) and out.shape[-1] == V:
            self.rows.append(out.shape[0])
        return out


@pytest.mark.parametrize("op", ["cross_entropy", "logprobs"])
def test_head_skips_unlabelled_rows(op):
    """Rows whose label is IGNORE_INDEX (prompt, padding) never reach the LM-head matmul, and the result
    and gradients are float64 log-softmax of the full logits: 0 and no gradient at the skipped rows."""
    from minirlhf import kernels

    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(23, 19, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, 19, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (23,), generator=g)
    labels[:6] = IGNORE_INDEX
    labels[15::3] = IGNORE_INDEX
    with HeadRows() as watch:
        if op == "cross_entropy":
            got = kernels.linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, "none", backend="torch")
        else:
            got = -kernels.linear_logprobs(hidden, weight, labels, backend="torch")
        upstream = torch.randn(23, generator=g)
        (got * upstream).sum().backward()
    assert watch.rows and sum(watch.rows) <= 2 * int((labels != IGNORE_INDEX).sum())  # forward + recompute
    assert max(watch.rows) <= 7
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref = F.cross_entropy(h64 @ w64.T, labels, ignore_index=IGNORE_INDEX, reduction="none")
    (ref * upstream.double()).sum().backward()
    assert rel_err(got, ref.detach()) <= REL
    assert rel_err(hidden.grad, h64.grad) <= REL and rel_err(weight.grad, w64.grad) <= REL
    assert (got[labels == IGNORE_INDEX] == 0).all() and (hidden.grad[labels == IGNORE_INDEX] == 0).all()
