"""minirlhf.lora against hand-checkable identities and against PEFT + transformers (test-only oracles)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from minirlhf.lora import (  # noqa: E402
    LoRAConfig,
    LoRAError,
    LoRALinear,
    ModulesToSave,
    disable_adapters,
    effective_weight,
    inject_lora,
    lora_state_dict,
    main,
    merge_and_unload,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
)
from minirlhf.model import Transformer  # noqa: E402
from minirlhf.peft import load_adapter, save_adapter  # noqa: E402

TOL = 1e-5
VOCAB = 61


def hf_model(kind: str, seed: int = 0):
    """A tiny random transformers model; every weight perturbed so no constant init hides a bug."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
        cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  tie_word_embeddings=kind == "qwen2", bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One saved base model directory per family (with a tokenizer file for merge to copy)."""
    dirs = {}
    for kind in ("llama", "qwen2", "gpt2"):
        d = dirs[kind] = tmp_path_factory.mktemp(kind)
        hf_model(kind).save_pretrained(d)
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "family": kind}))
    return dirs


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def base_dir(request, family_dirs):
    return request.param, family_dirs[request.param]


@pytest.fixture
def llama_dir(family_dirs):
    return family_dirs["llama"]


def ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 9), generator=g)


def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """B starts at zero (adapter = identity); give every adapter tensor random values instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def adapted(path, **kw) -> Transformer:
    model = Transformer.from_pretrained(path).eval()
    inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8.0, **kw}))
    randomize_adapters(model)
    return model


# --------------------------------------------------------------------------------------------------
# identities


def test_lora_linear_matches_its_formula():
    # y = W x + b + (alpha / r) B A x, written out in float64
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    layer = LoRALinear(base, r=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ W.T + b + 2.0 * (x @ A.T @ B.T))
    rs = LoRALinear(base, r=4, alpha=6.0, rslora=True)
    assert rs.scaling == pytest.approx(6.0 / 2.0)  # alpha / sqrt(r) = 6 / sqrt(4)
    # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0
    fresh = LoRALinear(torch.nn.Linear(400, 8), r=16, alpha=1.0)
    assert fresh.lora_A.weight.abs().max() <= 1 / 400**0.5
    assert fresh.lora_A.weight.std() > 0.5 / (3 * 400) ** 0.5  # not collapsed: U(-c, c) has std c/sqrt(3)
    assert torch.count_nonzero(fresh.lora_B.weight) == 0


def test_zero_b_adapter_equals_base(llama_dir):
    base = Transformer.from_pretrained(llama_dir).eval()
    model = Transformer.from_pretrained(llama_dir).eval()
    inject_lora(model, LoRAConfig(target_modules="all-linear"))
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_A.weight)  # A random, B still zero: the update is exactly 0
    with torch.no_grad():
        assert torch.equal(model(ids()), base(ids()))


def test_merge_equals_unmerged_and_unmerge_restores(llama_dir):
    model = adapted(llama_dir, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(ids())
        merge_lora(model)
        merged = model(ids())
    assert not torch.equal(model.layers[0].self_attn.q_proj.weight, before["layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=TOL)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), unmerged, atol=TOL, rtol=TOL)


def test_disable_adapters_gives_base_and_restores(llama_dir):
    base = Transformer.from_pretrained(llama_dir).eval()
    model = adapted(llama_dir, target_modules="all-linear", modules_to_save=["embed_tokens"])
    x = ids()
    with torch.no_grad():
        expected_base, expected_adapted = base(x), model(x)
        assert not torch.allclose(expected_base, expected_adapted, atol=1e-3)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), expected_base, atol=TOL, rtol=TOL)
            with disable_adapters(model):  # nested: still off inside, still off after the inner block
                torch.testing.assert_close(model(x), expected_base, atol=TOL, rtol=TOL)
            torch.testing.assert_close(model(x), expected_base, atol=TOL, rtol=TOL)
        torch.testing.assert_close(model(x), expected_adapted, atol=TOL, rtol=TOL)
        with pytest.raises(RuntimeError, match="boom"), disable_adapters(model):
            raise RuntimeError("boom")
        torch.testing.assert_close(model(x), expected_adapted, atol=TOL, rtol=TOL)
        merge_lora(model)  # merged layers are unmerged inside the block and merged again after
        with disable_adapters(model):
            torch.testing.assert_close(model(x), expected_base, atol=TOL, rtol=TOL)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(x), expected_adapted, atol=TOL, rtol=TOL)


def test_only_adapter_parameters_train(llama_dir):
    model = Transformer.from_pretrained(llama_dir)
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2)
                         for p in ("q_proj", "v_proj") for ab in "AB"} | {"lm_head.modules_to_save.weight"}
    model(ids()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # counts by hand: q_proj [32 -> 32] and v_proj [32 -> 16] (2 kv heads of 8), r = 2, two layers;
    # lm_head copy 61 * 32
    lora = 2 * ((32 * 2 + 2 * 32) + (32 * 2 + 2 * 16))
    count = trainable_parameters(model)
    assert count.trainable == lora + VOCAB * 32
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    assert set(lora_state_dict(model)) == {n for n in trainable}


def test_dropout_only_in_training(llama_dir):
    base = Transformer.from_pretrained(llama_dir).eval()
    model = adapted(llama_dir, target_modules="all-linear", dropout=0.5)
    x = ids()
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(x)
        torch.manual_seed(1)
        d = model(x)
        assert not torch.allclose(c, d, atol=1e-4)
        # the dropout sits on the adapter branch only: with B = 0 training mode gives the base exactly
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.zero_()
        torch.testing.assert_close(model(x), base(x), atol=TOL, rtol=TOL)


def test_effective_weight_is_the_merged_weight(llama_dir):
    model = adapted(llama_dir, target_modules=["lm_head"])
    w = effective_weight(model.lm_head).detach().clone()
    merge_lora(model)
    torch.testing.assert_close(w, model.lm_head.weight, atol=1e-6, rtol=0)


def test_unknown_targets_name_the_valid_ones(llama_dir, tmp_path):
    model = Transformer.from_pretrained(llama_dir)
    with pytest.raises(LoRAError, match=r"'qproj'.*valid names: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                        r"up_proj, down_proj, lm_head"):
        inject_lora(model, LoRAConfig(target_modules=["qproj"]))
    with pytest.raises(LoRAError, match="no module named 'wte'"):
        inject_lora(model, LoRAConfig(modules_to_save=["wte"]))
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in model.modules())


def test_load_adapter_checks_config_and_keys(llama_dir, tmp_path):
    model = adapted(llama_dir, target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "a")
    other = adapted(llama_dir, target_modules=["q_proj", "v_proj"], r=2)
    with pytest.raises(LoRAError, match=r"layers.0.self_attn.q_proj: model has r=2, alpha=8; adapter r=4"):
        load_adapter(other, tmp_path / "a")
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    state.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(LoRAError, match=r"missing keys: base_model.model.model.layers.1.self_attn.v_proj"
                                        r".lora_B.weight; unexpected keys: .*layers.0.mlp.up_proj.lora_A"):
        load_adapter(Transformer.from_pretrained(llama_dir), tmp_path / "a")


# --------------------------------------------------------------------------------------------------
# PEFT and transformers as oracles

CASES = {
    # family -> LoRA settings; qwen2 is tied, so its lm_head goes through modules_to_save (an untied copy)
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], rslora=True),
    "qwen2": dict(target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"]),
    "gpt2": dict(target_modules="all-linear", modules_to_save=["norm"], alpha=5.0),  # q/k/v -> fused c_attn
}


def test_our_adapter_loads_in_peft(base_dir, tmp_path):
    kind, d = base_dir
    model = adapted(d, **CASES[kind])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(d))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        base_logits = hf(ids()).logits
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        expected = pm(input_ids=ids()).logits
        got = model(ids())
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter did something in PEFT
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)


def test_peft_adapter_loads_in_ours(base_dir, tmp_path):
    kind, d = base_dir
    targets = {"llama": ["q_proj", "k_proj", "o_proj", "up_proj"], "qwen2": "all-linear",
               "gpt2": ["c_attn", "attn.c_proj", "c_fc"]}[kind]
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, task_type="CAUSAL_LM",
                          modules_to_save=["lm_head"] if kind == "llama" else None,
                          rank_pattern={"k_proj": 2} if kind == "llama" else {},
                          fan_in_fan_out=kind == "gpt2")
    pm = peft.get_peft_model(hf, cfg)
    randomize_adapters(pm, seed=5)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm.eval()(input_ids=ids()).logits
    ours = load_adapter(Transformer.from_pretrained(d).eval(), tmp_path / "peft")
    if kind == "llama":
        assert ours.layers[0].self_attn.k_proj.r == 2 and ours.layers[0].self_attn.q_proj.r == 4
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), expected, atol=TOL, rtol=TOL)


def test_merged_model_loads_in_transformers(base_dir, tmp_path):
    kind, d = base_dir
    settings = dict(CASES[kind])
    if kind == "qwen2":  # LoRA on the tied lm_head: merging must untie it, not change the embedding
        settings = dict(target_modules=["q_proj", "o_proj", "gate_proj", "lm_head"], modules_to_save=["embed_tokens"])
    model = adapted(d, **settings)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(ids())
    main(["merge", "--base", str(d), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (d / "tokenizer_config.json").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, atol=TOL, rtol=TOL)
    if kind == "qwen2":
        assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()), expected, atol=TOL, rtol=TOL)


def test_gpt2_tied_lm_head_cannot_merge(family_dirs):
    model = adapted(family_dirs["gpt2"], target_modules=["lm_head"])
    with pytest.raises(LoRAError, match="shared with another module"):
        merge_lora(model)
    with pytest.raises(LoRAError, match="gpt2 ties lm_head"):
        merge_and_unload(model)


def test_gpt2_qkv_adapters_round_trip_through_fused_c_attn(family_dirs, tmp_path):
    d = family_dirs["gpt2"]
    targets = ["q_proj", "v_proj", "o_proj"]
    model = adapted(d, target_modules=targets)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # q and v (rank 4 each) become one rank-8 adapter on c_attn; alpha 16 keeps the scale 8/4 = 16/8
    assert cfg["target_modules"] == ["attn.c_attn", "attn.c_proj"]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d), tmp_path / "a")
    blocks = hf.base_model.model.transformer.h
    assert blocks[1].attn.c_attn.r["default"] == 8 and blocks[1].attn.c_attn.scaling["default"] == 2.0
    assert blocks[1].attn.c_proj.r["default"] == 4 and blocks[1].attn.c_proj.scaling["default"] == 2.0
    with torch.no_grad():
        expected = model(ids())
    fresh = load_adapter(Transformer.from_pretrained(d).eval(), tmp_path / "a")
    assert fresh.layers[0].self_attn.k_proj.r == 8  # q, k, v each get the fused rank, sharing A
    again = Transformer.from_pretrained(d).eval()
    inject_lora(again, LoRAConfig(r=4, alpha=8.0, target_modules=targets))
    load_adapter(again, tmp_path / "a")  # same adapters as saved: the blocks come back as they were
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(again)[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids()), expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(again(ids()), expected, atol=TOL, rtol=TOL)


def test_half_precision_base_keeps_float32_adapter(llama_dir):
    model = Transformer.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj"]))
    randomize_adapters(model)
    q = model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == q.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.bfloat16
    x64, A, B = x.double(), q.lora_A.weight.double(), q.lora_B.weight.double()
    ref = x64 @ q.weight.double().T + q.scaling * (x64 @ A.T @ B.T)
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)  # bfloat16 keeps ~3 digits


def test_pickled_or_damaged_adapter_files_are_refused_in_one_line(tmp_path, llama_dir):
    """An adapter_model.bin is never unpickled (its loading would run the marker code below), and a
    truncated adapter_model.safetensors names the file."""
    import pickle

    from minirlhf.hf_checkpoint import CheckpointError

    model = Transformer.from_pretrained(llama_dir)
    inject_lora(model, LoRAConfig(r=2, alpha=4))
    save_adapter(model, tmp_path / "a")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "kept.safetensors")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(LoRAError, match="adapter_model.bin: pickled adapters are never loaded"):
        load_adapter(Transformer.from_pretrained(llama_dir), tmp_path / "a")
    assert not marker.exists()

    data = (tmp_path / "a" / "kept.safetensors").read_bytes()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(Transformer.from_pretrained(llama_dir), tmp_path / "a")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_autocast_forward_and_grads_equal_peft_bit_for_bit(dropout):
    # LoRALinear casts x to bf16 once for both branches; PEFT lets autocast cast it for each matmul. The
    # roundings are the same (and the dropout mask is drawn on the float32 input in both), so output and
    # gradients must agree exactly, not just to a tolerance.
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40)
    ours = LoRALinear(base, r=8, alpha=16.0, dropout=dropout).train()
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout)
    theirs = PeftLinear(torch.nn.Linear(48, 40), "default", config, r=8, lora_alpha=16, lora_dropout=dropout).train()
    with torch.no_grad():
        theirs.base_layer.weight.copy_(base.weight)
        theirs.base_layer.bias.copy_(base.bias)
        torch.nn.init.normal_(ours.lora_B.weight)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 48)
    results = []
    for layer, (A, B) in ((ours, (ours.lora_A, ours.lora_B)),
                          (theirs, (theirs.lora_A["default"], theirs.lora_B["default"]))):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, A.weight.grad, B.weight.grad))
    assert results[0][0].dtype == torch.bfloat16
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_autocast_merged_and_disabled_layers_are_the_base_matmul():
    # merged or disabled: only the base branch, x cast once = what autocast gives for a plain nn.Linear.
    # (Merging happens outside the autocast block: autocast caches its cast of a weight that requires
    # grad for the block's duration, so an in-place merge inside it would not be seen by either side.)
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=8.0).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(7, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = base(x)
            layer.disabled = True
            assert torch.equal(layer(x), plain)
        layer.disabled = False
        merged = base.weight + layer.delta_weight()
        layer.merge()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), torch.nn.functional.linear(x, merged, base.bias))
