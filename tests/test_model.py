"""Our decoder against transformers (the test-only oracle) on tiny random models of each family."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minirlhf import kernels  # noqa: E402
from minirlhf.hf_checkpoint import CheckpointError  # noqa: E402
from minirlhf.model import ModelConfig, Transformer, pads_only_at_the_end, positions_from_documents  # noqa: E402

TOL = 1e-4
VOCAB = 97

# name -> (HF config class name, kwargs)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_bias_tied": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_linear_rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic_rope": ("LlamaConfig", dict(max_position_embeddings=8,
                                               rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict()),
}


def hf_model(kind: str, seed: int = 0):
    cls_name, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    if cls_name == "GPT2Config":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **extra)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
        base.update(extra)
        cfg = getattr(transformers, cls_name)(**base)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # HF initialises some weights (norms, biases) to constants; randomise everything so that a
    # swapped or untransposed tensor cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


def batch(seed: int = 1):
    """Two rows, the second left padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours = Transformer.from_pretrained(d).eval()
    return request.param, hf, ours, d


def test_logits_match_transformers(pair):
    kind, hf, ours, _ = pair
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        if kind == "llama_dynamic_rope":
            # HF scales dynamic-NTK frequencies by the batch's longest row, we by each row's own
            # length (so padding never changes a row): compare with HF on each row alone. A fresh
            # HF model, since HF keeps grown frequencies as state between calls.
            expected[1, 3:] = hf_model(kind)(input_ids=ids[1:, 3:]).logits[0]
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOL, rtol=TOL)


def test_left_padding_equals_row_alone(pair):
    _, _, ours, _ = pair
    ids, mask = batch()
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)[1, 3:]
        alone = ours(ids[1:, 3:])[0]
    torch.testing.assert_close(padded, alone, atol=TOL, rtol=TOL)


def test_right_padding_runs_plain_causal_attention_and_equals_row_alone(pair, monkeypatch):
    """Right padding needs no mask (every key before a real token is real): the attention gets no document
    ids, and the real tokens' logits equal the row alone and transformers' with its padding mask."""
    kind, hf, ours, _ = pair
    ids, _ = batch()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    seen = []
    attention = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: seen.append(kw["document_ids"]) or attention(*a, **kw))
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)
        alone = ours(ids[1:, :8])[0]
        expected = hf(input_ids=ids, attention_mask=mask).logits
    assert seen and all(d is None for d in seen)
    torch.testing.assert_close(padded[1, :8], alone, atol=TOL, rtol=TOL)
    if kind != "llama_dynamic_rope":  # HF scales its frequencies by the batch's longest row (see above)
        torch.testing.assert_close(padded[mask.bool()], expected[mask.bool()], atol=TOL, rtol=TOL)


def test_pads_only_at_the_end():
    assert pads_only_at_the_end(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert pads_only_at_the_end(torch.tensor([[True, False], [False, False]]))
    assert not pads_only_at_the_end(torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))  # left padding
    assert not pads_only_at_the_end(torch.tensor([[1, 0, 1, 0]]))  # a pad between real tokens


def test_packed_documents_equal_each_document_alone(pair):
    _, _, ours, _ = pair
    ids, _ = batch()
    row = ids[:1]
    docs = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2])
    with torch.no_grad():
        packed = ours(row, document_ids=docs)[0]
        pieces = [ours(row[:, a:b])[0] for a, b in ((0, 4), (4, 9), (9, 11))]
    torch.testing.assert_close(packed, torch.cat(pieces), atol=TOL, rtol=TOL)


def test_greedy_generation_matches_transformers(pair):
    kind, hf, ours, _ = pair
    if kind == "llama_dynamic_rope":
        pytest.skip("HF recomputes dynamic-NTK frequencies per step differently under its cache")
    ids, mask = batch()
    ids, mask = ids[:, :7], mask[:, :7]
    ids = torch.cat([torch.zeros(2, 2, dtype=torch.long), ids], 1)  # make both rows left padded
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), mask], 1)
    ids[1, :5] = 0
    mask[1, :5] = 0
    eos = 5
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    out = ours.generate(ids, mask, max_new_tokens=6, temperature=0, eos_token_id=eos, pad_token_id=0)
    n = expected.shape[1]
    assert torch.equal(out.tokens[:, :n], expected)
    assert not out.mask[:, n:].any()


def test_float32_weights_under_bf16_autocast(pair):
    """The default on a GPU: float32 weights under bf16 autocast. q, k and v must reach attention in one
    dtype (RoPE used to return float32 q, k beside a bf16 v). The logits stay within bf16 rounding of the
    float32 ones (~2^-8 relative per op over two layers: 5% of the largest logit is a generous bound that a
    wrong position or a dropped head would still exceed), and generation through the KV cache runs and
    picks the autocast forward's greedy token first."""
    kind, _, ours, _ = pair
    ids, mask = batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(ids, attention_mask=mask)
            out = ours.generate(ids, mask, max_new_tokens=3, temperature=0, eos_token_id=-1, pad_token_id=0)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    err = (got[real].float() - expected[real]).abs().max()
    assert err <= 5e-2 * expected[real].abs().max(), f"{kind}: {err}"
    assert torch.equal(out.tokens[:, 0], got[:, -1].argmax(-1))
    assert torch.isfinite(out.logprobs).all()


def test_rope_in_bf16_is_the_float64_rotation_rounded_once():
    """apply_rope on bf16 q returns bf16, computed in float32: within one bf16 rounding (2^-8 relative) of
    the rotation done in float64, x * cos + rotate_half(x) * sin (RoFormer eq. 34)."""
    from minirlhf.model import apply_rope, rope_cos_sin

    config = ModelConfig(hidden_size=64, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1)
    positions = torch.arange(40)[None]
    cos, sin = rope_cos_sin(config, positions, torch.float32)
    x = torch.randn(1, 4, 40, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    got = apply_rope(x, cos, sin)
    x64, cos64, sin64 = x.double(), cos.double(), sin.double()
    half = x64.shape[-1] // 2
    expected = x64 * cos64 + torch.cat([-x64[..., half:], x64[..., :half]], -1) * sin64
    assert got.dtype == torch.bfloat16
    assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-6).all()


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    kind, hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(ids), atol=TOL, rtol=TOL)


def test_sharded_checkpoint_round_trip(tmp_path):
    hf = hf_model("llama_gqa")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = Transformer.from_pretrained(tmp_path / "ours").eval()
    ids, _ = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(again(ids), expected, atol=TOL, rtol=TOL)


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    hf_model("qwen2_tied").save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_load_casts_dtype(tmp_path):
    hf_model("llama_gqa").save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in ours.parameters())


def test_positions_restart_per_document():
    docs = torch.tensor([[3, 3, 3, 7, 7, 9]])
    assert positions_from_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0]]


# -- errors ----------------------------------------------------------------------------------------


def test_error_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        Transformer.from_pretrained(tmp_path)


def test_error_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama_gqa").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(tmp_path)
    weights[name] = weights[name][:, :5].contiguous()
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(64, 5\)"):
        Transformer.from_pretrained(tmp_path)


def test_error_no_weights(tmp_path):
    hf_model("gpt2").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        Transformer.from_pretrained(tmp_path)


def test_gqa_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=32)


# --------------------------------------------------------------------------------------------------
# generation on fused / prepacked weights (minirlhf/inference_weights.py)


def generate_both_ways(model, ids, mask, **kw):
    """Greedy generation with the modules' own weights and with the fused, prepacked ones."""
    kw = {"max_new_tokens": 5, "temperature": 0, "eos_token_id": [], "pad_token_id": 0, **kw}
    plain = model.generate(ids, mask, fused_weights=False, **kw)
    fused = model.generate(ids, mask, fused_weights=True, **kw)
    return plain, fused


def test_fused_generation_equals_modules(pair):
    """Stacked q/k/v and gate/up, biases (gpt2, qwen2) and oneDNN's prepacked layout change only the
    float32 rounding: same tokens, log-probs to 1e-5."""
    _, _, ours, _ = pair
    ids, mask = batch()
    plain, fused = generate_both_ways(ours, ids, mask)
    assert torch.equal(plain.tokens, fused.tokens)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    for layer in ours.layers:  # the fused weights are gone again
        assert layer.self_attn.frozen_qkv is None and layer.mlp.frozen_in is None


def test_fused_generation_folds_lora(tmp_path):
    """An active adapter is folded into the fused weights as W + s B A (dropout off in generation)."""
    from minirlhf.lora import LoRAConfig, inject_lora

    hf = hf_model("llama_gqa")
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ours.train()
    ids, mask = batch()
    plain, fused = generate_both_ways(ours, ids, mask)
    assert torch.equal(plain.tokens, fused.tokens)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    assert ours.training  # generate restores the mode it found
    with torch.no_grad():  # and the adapter did change the result
        base = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    assert not torch.equal(base, fused.tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_linear_equals_linear(dtype):
    from minirlhf.inference_weights import FrozenLinear

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    x = torch.randn(3, 5, 24, generator=g).to(dtype)
    for batch_hint in (1, 3, 8):
        got = FrozenLinear(weight, bias, batch_hint)(x)
        want = torch.nn.functional.linear(x, weight, bias)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_generation_mask_is_opened_in_place():
    """The one-token steps' mask starts with the real prompt slots open and opens one slot a step,
    matching the rule of the prefill mask (real queries see earlier real slots)."""
    from minirlhf.generation import prefill_mask, step_mask

    prompt = torch.tensor([[False, True, True], [True, True, True]])
    pre = prefill_mask(prompt, 5, torch.float32)  # (2, 1, 3, 5)
    step = step_mask(prompt, 5, torch.float32)  # (2, 1, 1, 5)
    # the last prompt query of each row sees exactly what a step's query sees before it writes slot 3
    assert torch.equal(pre[:, :, -1], step[:, :, 0])
    assert torch.equal(step[0, 0, 0] == 0, torch.tensor([False, True, True, False, False]))
    # a pad query sees only earlier pads: never an empty row
    assert torch.equal(pre[0, 0, 0] == 0, torch.tensor([True, False, False, False, False]))


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_packed_prefill_equals_the_full_forward(kind, tmp_path):
    """generation.prefill runs only the real tokens of left-padded prompts (packed in one row) through the
    projections and the MLP: each row's last hidden state equals the cache-free forward's, and the cache
    holds what the padded prompt pass writes on every real slot."""
    from minirlhf.generation import prefill, prefill_mask

    hf_model(kind).save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    ids, mask = torch.cat([ids, ids.flip(0)]), torch.cat([mask, mask.flip(0)])  # pads in rows 1 and 2
    real = mask.bool()
    B, P = ids.shape
    with torch.no_grad():
        expected = ours.hidden_states(ids, attention_mask=mask)[:, -1]
        ours.setup_kv_cache(B, P + 4)
        ours.decode_step(ids, (mask.cumsum(-1) - 1).clamp(min=0), torch.arange(P), prefill_mask(real, P, torch.float32))
        padded_cache = [(a.kv_cache.k.clone(), a.kv_cache.v.clone()) for a in (m.self_attn for m in ours.layers)]
        ours.setup_kv_cache(B, P + 4)
        got = prefill(ours, ids, real)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for layer, (k, v) in zip(ours.layers, padded_cache):
        cache = layer.self_attn.kv_cache
        torch.testing.assert_close(cache.k[:, :, :P].transpose(1, 2)[real], k[:, :, :P].transpose(1, 2)[real])
        torch.testing.assert_close(cache.v[:, :, :P].transpose(1, 2)[real], v[:, :, :P].transpose(1, 2)[real])
    ours.clear_kv_cache()


def test_cache_attention_reads_only_the_slots_its_mask_covers():
    """A cache pass attends over the first S cache slots, S the mask's length (the slots written so far):
    on a cache whose every slot starts as NaN, the prompt pass and a step with masks over the written slots
    stay finite and equal what masks over the whole preallocated (clean) cache give, and the cache-free
    forward on the prompt; with a whole-cache mask the NaN slots would be read."""
    from minirlhf.generation import prefill_mask, step_mask

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(config).eval()
    ids, mask = batch()
    ids, real = ids % 61, mask.bool()
    (B, P), S = ids.shape, 16
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_pos, slot = torch.tensor([[5], [7]]), positions[:, -1:] + 1, torch.tensor([P])

    def passes(poisoned: bool, length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt pass and one step, with masks over `length` slots (None: the whole cache)."""
        model.setup_kv_cache(B, S)
        for layer in model.layers:
            layer.self_attn.kv_cache.k.fill_(float("nan") if poisoned else 0.0)
            layer.self_attn.kv_cache.v.fill_(float("nan") if poisoned else 0.0)
        with torch.no_grad():
            first = model.decode_step(ids, positions, torch.arange(P), prefill_mask(real, length or S, torch.float32))
            step = step_mask(real, S, torch.float32)
            step[..., P] = 0.0  # the step's own slot
            second = model.decode_step(step_ids, step_pos, slot, step[..., : P + 1] if length else step)
        model.clear_kv_cache()
        return first, second

    sliced, whole = passes(poisoned=True, length=P), passes(poisoned=False, length=None)
    assert sliced[0].isfinite().all() and sliced[1].isfinite().all()
    torch.testing.assert_close(sliced[0][real], whole[0][real], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sliced[1], whole[1], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(sliced[0][real], model.hidden_states(ids, mask)[real], atol=1e-5, rtol=1e-5)
    assert not passes(poisoned=True, length=None)[1].isfinite().all()  # the poison is seen when read


@pytest.mark.slow
def test_compiled_step_generates_the_same_tokens(tmp_path):
    """generate(compile=True) runs each step through torch.compile, its matmuls on the prepacked weights
    (oneDNN's op, which inductor would not take, wrapped as `prepacked_linear`): same tokens as eager. All
    the steps of a call share one graph; calls of the same shapes reuse it; another cache length compiles
    once more, symbolically, and a third one reuses that."""
    from torch._dynamo.utils import counters

    hf = hf_model("llama_gqa")
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    kw = {"max_new_tokens": 4, "temperature": 0, "eos_token_id": [], "pad_token_id": 0}
    eager = ours.generate(ids, mask, **kw)
    torch._dynamo.reset()
    counters.clear()
    with torch.profiler.profile() as profile:
        compiled = ours.generate(ids, mask, compile=True, **kw)
    assert torch.equal(eager.tokens, compiled.tokens)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
    # float32 from batch 2 is prepacked (inference_weights._mkldnn_packs); the compiled step calls the wrapper
    assert "minirlhf::prepacked_linear" in {event.key for event in profile.key_averages()}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1  # every step attends one slot more: the length is symbolic from the first step on
    ours.generate(ids, mask, compile=True, **kw)
    assert counters["stats"]["unique_graphs"] == graphs  # new fused weights, same shapes: nothing compiled
    longer = ours.generate(ids, mask, compile=True, **{**kw, "max_new_tokens": 6})
    assert torch.equal(longer.tokens, ours.generate(ids, mask, **{**kw, "max_new_tokens": 6}).tokens)
    graphs = counters["stats"]["unique_graphs"]
    ours.generate(ids, mask, compile=True, **{**kw, "max_new_tokens": 9})
    assert counters["stats"]["unique_graphs"] == graphs  # the symbolic step serves a third length


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_match_eager(checkpointing):
    """Transformer.compile_blocks: the training forward and its gradients equal the eager ones (float32,
    packed documents and left padding), with and without activation checkpointing; no-grad forwards stay
    eager (nothing is compiled for them)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(config).train()
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, 61, (2, 11))
    documents = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, mask, documents).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks()
    with torch.no_grad():
        model(ids, mask, documents)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_loss, compiled_grads = loss_and_grads()
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-7)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
