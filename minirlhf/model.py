"""One decoder for the LLaMA family (llama, mistral, qwen2) and GPT-2, read top to bottom.

The families differ only by switches on `ModelConfig`:

    family   norm       positions         mlp              biases              embeddings
    llama    RMSNorm    RoPE              SwiGLU           optional (attn)     tied or untied
    mistral  RMSNorm    RoPE              SwiGLU           none                untied
    qwen2    RMSNorm    RoPE              SwiGLU           q, k, v             tied or untied
    gpt2     LayerNorm  learned absolute  GELU (tanh)      everywhere          tied

Module names follow Hugging Face's llama without the leading "model." (`layers.0.self_attn.q_proj`),
so LoRA targets read the same as in PEFT; `hf_checkpoint.py` maps GPT-2's names onto these.

Positions always count from each row's first real token (left padding) or from the start of each
packed document, for every family, so a padded or packed row gives the same result as that row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirlhf import kernels

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [B, 1, T, d] each (rope_cos_sin)


@dataclass
class ModelConfig:
    """Architecture of a decoder; `checkpoint.config_from_hf` fills it from an HF config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6  # rms_norm_eps (llama family) or layer_norm_epsilon (gpt2)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"dynamic"|"llama3", ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral; recorded, not applied (see docs/model.md)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields we carry through untouched

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(FAMILIES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.is_gpt2:
            self.tie_word_embeddings = self.qkv_bias = self.o_bias = self.mlp_bias = True

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"


# --------------------------------------------------------------------------------------------------
# Positions


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from its row's first real token; pads get 0.

    attention_mask: [B, T] (1 real, 0 pad)  ->  [B, T] long
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def pads_only_at_the_end(attention_mask: torch.Tensor) -> bool:
    """True when no row has a pad before a real token (no padding, or right padding).

    Then plain causal attention is exact for every real token: the keys before it are all real. Only the
    pads' own outputs change (they see the real tokens too), and nothing reads them. Plain causal attention
    takes the kernels' fast path, without a [B, 1, T, T] mask (SDPA's CPU flash kernel: ~8 ms of 84 a layer
    forward and backward at B = 4, T = 512, SmolLM2-135M's heads). attention_mask: [B, T] (1 real, 0 pad).
    """
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the start of its packed document.

    document_ids: [B, T] (equal ids for tokens of one document, contiguous)  ->  [B, T] long
    """
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_of_doc = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - start_of_doc


# --------------------------------------------------------------------------------------------------
# Rotary embeddings (Su et al. 2021, "RoFormer", eq. 34) with the scalings in use by real checkpoints


def rope_inv_freq(config: ModelConfig, seq_len: torch.Tensor) -> torch.Tensor:
    """Inverse frequencies theta_i = base^(-2i/d) for i < d/2, scaled as config.rope_scaling says.

    - linear (Chen et al. 2023, position interpolation): positions divided by `factor`.
    - dynamic (NTK-aware, as in HF): when a row's length exceeds max_position_embeddings its base
      grows to base * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2)). HF decides this
      once per batch; we decide per row, so that padding never changes a row's result.
    - llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp in between.
    seq_len: [B] each row's length  ->  [B, d/2] float32.
    """
    d = config.head_dim
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    base = torch.full(seq_len.shape, config.rope_theta, dtype=torch.float64, device=seq_len.device)
    if kind == "dynamic":
        factor, max_pos = scaling["factor"], config.max_position_embeddings
        ratio = factor * seq_len.double() / max_pos - (factor - 1)
        base = torch.where(seq_len > max_pos, base * ratio ** (d / (d - 2)), base)
    exponents = torch.arange(0, d, 2, device=seq_len.device, dtype=torch.int64).double() / d
    inv_freq = (1.0 / base[:, None] ** exponents).float()  # (B, d/2)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen) - low) / (high - low)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        in_between = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(in_between, ramp, inv_freq)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, dynamic, llama3)")
    return inv_freq


def rope_is_dynamic(config: ModelConfig) -> bool:
    """Whether the inverse frequencies depend on the sequence length (dynamic NTK scaling)."""
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) == "dynamic"


def rope_cos_sin(
    config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor | None = None
) -> Rope:
    """cos, sin tables for the given positions: [B, T] -> two [B, 1, T, d] tensors.

    inv_freq: [B or 1, d/2] from `rope_inv_freq`, when the caller has it already (the decode loop,
    for scalings that do not depend on the length); None computes it from the positions.
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(config, positions.max(-1).values + 1)  # (B, d/2)
    angles = positions.float()[..., None] * inv_freq[:, None, :]  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle. x: [B, H, T, d].

    Computed in float32 (cos, sin are float32 tables) and returned in x's dtype, so q and k leave RoPE
    in the dtype v has: bf16 under autocast even when the weights (and so the embeddings) are float32.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # fp32 statistics, as HF computes them
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.is_gpt2:
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, config.norm_eps)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: written in place, never re-concatenated.

    k, v: [B, Hkv, S_max, d]
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, t, d] at the cache slots `slots` [t], or packed tokens k, v [1, Hkv, N, d] at
        slots [2, N] (each token's row and slot); return the first `length` slots of the cache
        [B, Hkv, length, d] (views, no copy), whose unwritten slots the attention mask hides.
        k, v come in the compute dtype (bf16 under autocast) and are stored in the cache's (the weights')."""
        if slots.dim() == 1:
            self.k.index_copy_(2, slots, k.to(self.k.dtype))
            self.v.index_copy_(2, slots, v.to(self.v.dtype))
        else:
            rows, cols = slots
            self.k[rows, :, cols] = k[0].transpose(0, 1).to(self.k.dtype)  # (N, Hkv, d)
            self.v[rows, :, cols] = v[0].transpose(0, 1).to(self.v.dtype)
        return self.k[:, :, :length], self.v[:, :, :length]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, Hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, d
        self.q_proj = nn.Linear(config.hidden_size, H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * d, config.hidden_size, bias=config.o_bias)
        self.kv_cache: KVCache | None = None
        # set by generation for its duration (minirlhf/inference_weights.py): q, k, v in one matmul
        self.frozen_qkv = self.frozen_o = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, C] -> q [B, T, H*d], k and v [B, T, Hkv*d]."""
        if self.frozen_qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv_heads * self.head_dim
        return self.frozen_qkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x: torch.Tensor, rope: Rope | None, document_ids: torch.Tensor | None,
                cache_slots: torch.Tensor | None, cache_mask: torch.Tensor | None, backend: str) -> torch.Tensor:
        """x: [B, T, C] -> [B, T, C]. rope: (cos, sin) of the positions, None for gpt2; document_ids: [B, T]
        or None; with a KV cache, see `attend_cache` for cache_slots and cache_mask."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is None:
            y = kernels.attention(q, k, v, document_ids=document_ids, backend=backend)
        else:
            y = self.attend_cache(q, k, v, cache_slots, cache_mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*d)
        return (self.frozen_o or self.o_proj)(y)

    def attend_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Write the new keys and values to the KV cache and attend over its first S slots.

        q: [B, H, t, d], k, v: [B, Hkv, t, d] of t new tokens a row, written at slots [t]; mask: [B, 1, t, S]
        additive, hiding what a query must not see. Returns [B, H, t, d].
        Or packed, for a prompt pass from slot 0 that skips the pads: q: [1, H, N, d], k, v: [1, Hkv, N, d]
        for the N real tokens, slots: [2, N] each one's row and slot (slot = its query's row in the
        mask), mask: [rows, 1, P, S]. Returns [1, H, N, d].
        """
        k, v = self.kv_cache.update(slots, k, v, mask.shape[-1])  # (B or rows, Hkv, S, d)
        if slots.dim() == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        rows, cols = slots
        padded = q.new_zeros(mask.shape[0], mask.shape[2], self.n_heads, self.head_dim)  # (rows, P, H, d)
        padded[rows, cols] = q[0].transpose(0, 1)
        y = F.scaled_dot_product_attention(padded.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2)[rows, cols].transpose(0, 1)[None]  # (1, H, N, d)


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)) (Shazeer 2020), or GPT-2's down(gelu(up(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = not config.is_gpt2
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        # set by generation for its duration (minirlhf/inference_weights.py): gate and up in one matmul
        self.frozen_in = self.frozen_down = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C] -> down(silu(gate(x)) * up(x)) (SwiGLU) or GPT-2's down(gelu(up(x)))."""
        down = self.frozen_down or self.down_proj  # frozen_*: set while generating (inference_weights.py)
        if not self.gated:
            return down(F.gelu((self.frozen_in or self.up_proj)(x), approximate="tanh"))
        if self.frozen_in is None:
            gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        else:
            gate, up = self.frozen_in(x).chunk(2, dim=-1)  # one (B, T, 2I) matmul
        return down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: Rope | None, document_ids: torch.Tensor | None,
                cache_slots: torch.Tensor | None = None, cache_mask: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        """x: [B, T, C] -> [B, T, C] (the arguments as in Attention.forward)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, document_ids, cache_slots, cache_mask, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_block(layer: Block, x: torch.Tensor, rope: Rope | None, document_ids: torch.Tensor | None,
               cache_slots: torch.Tensor | None, cache_mask: torch.Tensor | None, backend: str) -> torch.Tensor:
    """layer(x, ...) as a plain function of the layer: what `Transformer.compile_blocks` compiles, once for
    all layers."""
    return layer(x, rope, document_ids, cache_slots, cache_mask, backend)


# --------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """Decoder-only transformer; `forward` gives logits, `hidden_states` the final normed states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.is_gpt2:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.kv_cache_inv_freq: torch.Tensor | None = None
        self.kernel_backend = "auto"  # "auto" | "triton" | "torch", see minirlhf/kernels
        self.compiled_block = None  # set by compile_blocks
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) weights, zero biases; residual outputs scaled by 1/sqrt(2L)
        (GPT-2 paper, section 2.3)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for name in ("o_proj", "down_proj"):
            sub = getattr(module, name, None)
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    # -- forward -------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states, no LM head (reward model, critic and fused losses use these).

        input_ids: [B, T]; attention_mask: [B, T] 1 real / 0 pad (left or right padding);
        document_ids: [B, T] ints marking packed documents (no attention across them, positions
        restart in each). Returns [B, T, hidden_size].
        """
        if document_ids is not None:
            positions = positions_from_documents(document_ids)
            if attention_mask is not None:  # pads become a document of their own
                document_ids = torch.where(attention_mask.bool(), document_ids, -1)
        elif attention_mask is not None:  # (without pads, positions_from_mask is the arange below)
            positions = positions_from_mask(attention_mask)
            # no pads, or right padding, needs no mask: causal attention alone is exact for every real token
            document_ids = None if pads_only_at_the_end(attention_mask) else attention_mask.long()
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self._decode(input_ids, positions, document_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for input_ids [B, T] (see `hidden_states` for the arguments)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, document_ids))

    def _decode(self, input_ids: torch.Tensor, positions: torch.Tensor, document_ids: torch.Tensor | None = None,
                cache_slots: torch.Tensor | None = None, cache_mask: torch.Tensor | None = None,
                inv_freq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        rope = None
        if self.config.is_gpt2:
            x = x + self.embed_positions(positions)
        else:
            rope = rope_cos_sin(self.config, positions, torch.float32, inv_freq)
        training = self.training and torch.is_grad_enabled()
        compiled = training and cache_slots is None and self.compiled_block is not None
        run = self.compiled_block if compiled else _run_block
        args = (rope, document_ids, cache_slots, cache_mask, self.kernel_backend)
        for layer in self.layers:
            if self.activation_checkpointing and training:
                x = checkpoint(run, layer, x, *args, use_reentrant=False)
            else:
                x = run(layer, x, *args)
        return self.norm(x)

    # -- torch.compile ---------------------------------------------------------------------------

    def compile_blocks(self) -> None:
        """Run every block's training forward, and so its backward, through torch.compile ([train] compile).

        Inductor fuses the elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU, the residual adds,
        the autocast casts) into a few generated kernels, C++ on a CPU and Triton on a GPU, and its
        partitioner keeps fewer activations for the backward. One compiled function serves all blocks (they
        differ only by their weights, which it takes as inputs), so it compiles once per kind of batch
        (with or without document ids; the first new length makes the length dynamic), not once per layer:
        tens of seconds on a CPU, reported by the trainer. Evaluation, reference and rollout forwards
        (no gradient) and generation stay eager: their shapes change every call.
        """
        self.compiled_block = torch.compile(_run_block)

    # -- KV cache ------------------------------------------------------------------------------

    def setup_kv_cache(self, batch: int, max_len: int) -> None:
        """Allocate one preallocated KVCache per layer for generation (see minirlhf/generation.py),
        and the RoPE inverse frequencies [1, d/2] once, unless they depend on the length (dynamic)."""
        p = self.embed_tokens.weight
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim, p.dtype, p.device)
        self.kv_cache_inv_freq = None
        if not self.config.is_gpt2 and not rope_is_dynamic(self.config):
            any_length = torch.ones(1, dtype=torch.long, device=p.device)
            self.kv_cache_inv_freq = rope_inv_freq(self.config, any_length)  # (1, d/2)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.kv_cache_inv_freq = None

    def decode_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Run t new tokens through the KV cache and return their hidden states [B, t, hidden_size].

        input_ids, positions: [B, t]; slots: [t] long, the cache slots the new keys and values go to (or a
        prompt pass packed without its pads: input_ids, positions [1, N], slots [2, N], see
        `Attention.attend_cache`);
        mask: [B, 1, t, S] additive over the first S <= S_max cache slots (0 where a query may attend a
        slot, -inf elsewhere, unwritten slots included), in the cache's dtype: the attention reads those S
        slots only, so a step costs what the filled part of the cache does; minirlhf/generation.py builds
        it. Tensors only, so a compiled step is traced once with S symbolic (`generation.compiled_step`).
        """
        return self._decode(input_ids, positions, cache_slots=slots, cache_mask=mask,
                            inv_freq=self.kv_cache_inv_freq)

    # -- conveniences --------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.config.is_gpt2:
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12 * L * H * d * T (Kaplan et al. 2020; PaLM appendix B)."""
        c = self.config
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * c.num_hidden_layers * (
            c.num_attention_heads * c.head_dim * seq_len
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Sample continuations with the KV cache; see `minirlhf.generation.generate`."""
        from minirlhf.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None) -> "Transformer":
        """Load an HF-format directory (llama, mistral, qwen2, gpt2); see minirlhf/hf_checkpoint.py."""
        from minirlhf.hf_checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and (sharded) safetensors in HF format; see minirlhf/hf_checkpoint.py."""
        from minirlhf.hf_checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
