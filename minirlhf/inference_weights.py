"""Weights laid out for generation: fused projections, LoRA folded in, prepacked for the CPU's matmul library.

Training keeps one nn.Linear per projection, because LoRA targets q_proj, k_proj, v_proj, gate_proj and
up_proj separately, PEFT adapter files name them, FSDP shards per block and GPT-2's c_attn is split into
them at load. Generation instead reads every weight once per new token without changing it, so
`generate` builds, once per call:

    qkv      [(H + 2 Hkv) d, C]   q_proj, k_proj, v_proj stacked: one matmul instead of three
    o        [C, H d]
    gate_up  [2 I, C]             gate_proj, up_proj stacked (SwiGLU); GPT-2 keeps its single up_proj
    down     [C, I]
    head     [V, C]

each from `lora.effective_weight` (W + s B A for an active adapter, so a LoRA policy decodes at the cost
of its base), and on the CPU re-laid out once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`,
what inductor does when it freezes a model): measured on the 135M SmolLM2, one thread, all the
decode-step matmuls took 50 instead of 76 ms at batch 8 and 84 instead of 96 ms at batch 32 in float32,
29 instead of 41 ms at batch 1 in bfloat16; at batch 1 in float32 the step is bound by memory bandwidth
either way (benchmarks/generate.py --section matmuls).

Memory, while `generate` runs (freed when it returns): one more copy of every prepacked weight and of
the stacked q/k/v and gate/up ones, that is, up to the model's weight bytes minus its input embedding
(+0.54 GB for the 135M model in float32 with its tied head, +0.27 GB in bfloat16; at batch 1 in float32
only the stacked ones, +0.32 GB). `generate(..., fused_weights=False)` decodes with the modules' own
weights instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.lora import ModulesToSave, effective_weight


def _mkldnn_packs(weight: torch.Tensor, batch: int) -> bool:
    """Whether to hand this weight to oneDNN prepacked: on the CPU, bf16 (with AVX512-BF16 or AMX) at
    any batch, float32 from batch 2 (at batch 1 a float32 step is bound by memory bandwidth and oneDNN's
    matrix-vector product was slower than the default one: 68 against 56-61 ms a step)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return batch > 1
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.library.custom_op("minirlhf::prepacked_linear", mutates_args=())
def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
                     ) -> torch.Tensor:
    """oneDNN's linear on a weight in its blocked layout (`_reorder_linear_weight`). x: [..., in] ->
    [..., out_features]. An op of its own so that torch.compile calls it as it is: inductor's lowering of
    oneDNN's linear accepts only weights it froze itself, and freezing would bake the weights into the
    compiled step (stale once training changes them); around this op inductor still fuses everything else."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@prepacked_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class FrozenLinear:
    """y = x W^T + b for a weight that stays fixed while this object lives.

    weight: [out, in], bias: [out] or None; batch: the number of rows the packing is tuned for (any
    number of rows still works). On the CPU the weight is held only in oneDNN's blocked layout, unless
    prepack is False (autocast: oneDNN's op takes no part in it, F.linear does).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch: int, prepack: bool = True):
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        self.packed = prepack and _mkldnn_packs(weight, batch)
        weight = weight.detach().contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and torch.compiler.is_compiling():
            return prepacked_linear(x, self.weight, self.bias, self.out_features)
        if self.packed:  # eager: the op itself; the custom op's dispatch adds ~12 us a call (1.5 ms a SmolLM2 step)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    return _bias(linear.active) if isinstance(linear, ModulesToSave) else linear.bias


def _stacked(linears: list[nn.Module], batch: int, prepack: bool) -> FrozenLinear:
    """One FrozenLinear computing [l(x) for l in linears] concatenated on the last dimension (an active
    LoRA adapter's dropout is not applied: generation runs in eval mode)."""
    weights = [effective_weight(m) for m in linears]
    biases = [_bias(m) for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
    return FrozenLinear(torch.cat(weights) if len(weights) > 1 else weights[0], bias, batch, prepack)


def can_fuse(model: nn.Module) -> bool:
    """Fusing reads every weight whole: not possible while FSDP holds them sharded (DTensors; inside
    `distributed.unsharded` they are whole again), nor on the meta device."""
    return all(type(p) in (torch.Tensor, nn.Parameter) and not p.is_meta for p in model.parameters())


def worth_fusing(model: nn.Module, batch: int) -> bool:
    """Whether building the weights pays for itself: always, except
    - a float32 model on the CPU at batch 1, where nothing is prepacked (see `_mkldnn_packs`) and stacking
      q/k/v and gate/up saves ~1 ms a step for a build of ~0.3 s (the copies' page faults, 135M SmolLM2);
    - a float32 model on the CPU from batch 64, where a decode step gained nothing (233 against 227 ms,
      SmolLM2, one thread; 84 against 126 ms at batch 8, 150 against 165 at batch 32);
    - under autocast (the matmuls run in the autocast dtype from the modules' weights, whose casts
      autocast caches)."""
    weight = model.embed_tokens.weight
    if torch.is_autocast_enabled(weight.device.type):
        return False
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    return can_fuse(model) and not (cpu_fp32 and (batch == 1 or batch >= 64))


@contextmanager
def inference_weights(model, batch: int, prepack: bool = True) -> Iterator[FrozenLinear]:
    """Attach fused (and on CPU prepacked) weights to every block of `model` (a Transformer) for the
    duration, and yield the LM head as a FrozenLinear; the modules' own parameters are untouched.

    batch: the decode batch size, the row count the packing is tuned for. prepack: see FrozenLinear.
    """
    try:
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.frozen_qkv = _stacked([attn.q_proj, attn.k_proj, attn.v_proj], batch, prepack)
            attn.frozen_o = _stacked([attn.o_proj], batch, prepack)
            mlp.frozen_in = _stacked([mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj], batch, prepack)
            mlp.frozen_down = _stacked([mlp.down_proj], batch, prepack)
        yield _stacked([model.lm_head], batch, prepack)
    finally:
        for layer in model.layers:
            layer.self_attn.frozen_qkv = layer.self_attn.frozen_o = None
            layer.mlp.frozen_in = layer.mlp.frozen_down = None
