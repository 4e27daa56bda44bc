"""Low-rank adapters (LoRA, Hu et al. 2021) on our Transformer, saved and loaded in PEFT's file layout.

A wrapped projection computes (Hu et al. 2021, eq. 3)

    y = W x + b + s * B A dropout(x),     A: [r, in], B: [out, r],   s = alpha / r

with W, b frozen, A Kaiming-uniform (as nn.Linear and PEFT initialise it) and B zero, so a fresh adapter
leaves the model unchanged. With `rslora` the scale is s = alpha / sqrt(r) (Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA", theorem 3.2), which keeps the update's size
independent of the rank.

`modules_to_save` wraps a module (embed_tokens, lm_head after a vocabulary change) in `ModulesToSave`: a
trainable full copy used while the adapter is on, the frozen original while it is off.
`disable_adapters(model)` turns every adapter off, so the model is its own reference model (DPO, PPO)
without a second copy of the weights.

On disk an adapter is PEFT's: adapter_config.json plus adapter_model.safetensors with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (HF module names, no adapter name), so
`peft.PeftModel.from_pretrained` reads ours and `load_adapter` reads PEFT's.

GPT-2: HF fuses q, k and v into one `c_attn` projection. Separate q/k/v adapters are exported exactly as
one rank-(r_q + r_k + r_v) adapter on c_attn: A = [A_q; A_k; A_v] stacked, B block-diagonal
diag(B_q, B_k, B_v) (the rank and alpha go in PEFT's `rank_pattern` / `alpha_pattern`). Loaded into a
model that already has those q/k/v adapters, the blocks come back as they were; loaded into a model
without adapters (or from PEFT's own c_attn adapters), q, k and v each get an adapter of c_attn's rank
that shares its A and takes its rows of B: the same function with a larger rank. In PEFT one dropout
mask feeds q, k and v, in ours each draws its own, which only matters in training.

Run `python -m minirlhf.lora merge --base BASE --adapter ADAPTER --out OUT` to write a merged model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.checkpoint import GPT2_BLOCK_NAMES, GPT2_TOP_NAMES, read_tensors, save_safetensors
from minirlhf.errors import UserError
from minirlhf.model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# files that merge_and_save copies next to the merged weights (the adapter's own copies win)
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class LoRAError(UserError, ValueError):
    """An adapter that cannot be built, saved, loaded or merged as asked."""


@dataclass
class LoRAConfig:
    """What to adapt and how; the field names are those of config.py's [lora] section."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    target_modules: str | Sequence[str] = "all-linear"  # "all-linear" or names from LINEAR_TARGETS
    modules_to_save: Sequence[str] = field(default_factory=list)  # e.g. ["embed_tokens", "lm_head"]


# --------------------------------------------------------------------------------------------------
# Modules


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = W x + b + s * B A dropout(x).

    Keeps the wrapped layer's own `weight` and `bias` Parameters (a tied lm_head stays tied, and the
    base keys of the state dict keep their names); adds `lora_A` ([r, in]) and `lora_B` ([out, r]).
    When the base is float16/bfloat16 the adapter is float32 (as PEFT's autocast_adapter_dtype), and
    its input is cast to float32 and its output back.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        nn.Module.__init__(self)
        if r < 1:
            raise LoRAError(f"LoRA rank r must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        dtype = base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.reset_lora_parameters()
        self.merged = False
        self.disabled = False
        self.shares_weight = False  # set by inject_lora for a tied lm_head: merge() would change the embedding

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B A: [out, in], in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A in place; forward then skips the adapter branch."""
        if self.merged:
            return
        if self.shares_weight:
            raise LoRAError(
                "this layer's weight is shared with another module (lm_head tied to embed_tokens): "
                "merging in place would change both; use merge_and_unload(model), which unties them"
            )
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A: the base back (exactly up to rounding of the add and subtract)."""
        if not self.merged:
            return
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout_p:g}")


class ModulesToSave(nn.Module):
    """A trainable full copy of `original_module`, used instead of it while the adapter is on.

    The names `original_module` and `modules_to_save` are PEFT's, so the saved keys line up.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)
        self.modules_to_save.requires_grad_(True)
        self.disabled = False

    @property
    def active(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    @property
    def weight(self) -> torch.Tensor:
        return self.active.weight

    def forward(self, *args, **kwargs):
        return self.active(*args, **kwargs)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    """Whether the model carries adapters (or modules_to_save copies), i.e. saves as an adapter."""
    return next(lora_layers(model), None) is not None or next(saved_modules(model), None) is not None


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a fused LM-head loss should use: W + s B A for an active unmerged adapter (dropout
    is not applied), the active copy for ModulesToSave, else `linear.weight`."""
    if isinstance(linear, ModulesToSave):
        return effective_weight(linear.active)
    if isinstance(linear, LoRALinear) and not (linear.merged or linear.disabled):
        return linear.weight + linear.delta_weight().to(linear.weight.dtype)
    return linear.weight


# --------------------------------------------------------------------------------------------------
# Injection


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Our projections by name: every nn.Linear that is not part of an adapter."""
    out = {}
    for name, m in model.named_modules():
        adapter_part = re.search(r"(^|\.)(lora_A|lora_B|modules_to_save|original_module)(\.|$)", name)
        if isinstance(m, nn.Linear) and not adapter_part:
            out[name] = m
    return out


def _resolve_targets(model: Transformer, target_modules: str | Sequence[str]) -> list[str]:
    """Our module names that the targets select; 'all-linear' = every block projection (no lm_head)."""
    linears = _plain_linears(model)
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise LoRAError(f"target_modules must be 'all-linear' or a list of names from "
                            f"{', '.join(LINEAR_TARGETS)}; got {target_modules!r}")
        return [n for n in linears if n.startswith("layers.")]
    present = sorted({n.rpartition(".")[2] for n in linears}, key=LINEAR_TARGETS.index)
    unknown = [t for t in target_modules if t not in present]
    if unknown or not target_modules:
        raise LoRAError(
            f"unknown LoRA target_modules {unknown or list(target_modules)} for a {model.config.model_type} "
            f"model; valid names: {', '.join(present)} (or 'all-linear')"
        )
    return [n for n in linears if n.rpartition(".")[2] in set(target_modules)]


def _match_saved(model: nn.Module, names: Sequence[str]) -> list[str]:
    candidates = [n for n, _ in model.named_modules() if n and not isinstance(model.get_submodule(n), nn.ModuleList)]
    out = []
    for want in names:
        hits = [n for n in candidates if n == want or n.endswith("." + want)]
        if not hits:
            raise LoRAError(f"modules_to_save: no module named {want!r}; top-level choices: "
                            f"{', '.join(n for n in candidates if '.' not in n)}")
        out += hits
    return out


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {k for k, c in counts.items() if c > 1}


def _wrap(model: Transformer, ranks: dict[str, tuple[int, float]], to_save: Sequence[str],
          dropout: float, rslora: bool) -> None:
    """Freeze the model; wrap each named projection in LoRALinear with its (r, alpha), and each of
    to_save in ModulesToSave."""
    if any(True for _ in lora_layers(model)) or any(True for _ in saved_modules(model)):
        raise LoRAError("the model already has adapters; inject them once per model")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
    overlap = set(ranks) & set(to_save)
    if overlap:
        raise LoRAError(f"{', '.join(sorted(overlap))} cannot be both a LoRA target and in modules_to_save")
    shared = _shared_parameter_ids(model)
    model.requires_grad_(False)
    for name in to_save:
        module = model.get_submodule(name)
        _set_module(model, name, ModulesToSave(module).train(module.training))
    for name, (r, alpha) in ranks.items():
        base = model.get_submodule(name)
        layer = LoRALinear(base, r, alpha, dropout, rslora)
        layer.shares_weight = id(base.weight) in shared
        layer.train(base.training)
        _set_module(model, name, layer)


def inject_lora(model: Transformer, config: LoRAConfig) -> list[str]:
    """Freeze the model, wrap the target projections in LoRALinear and modules_to_save in
    ModulesToSave, in place. Returns the wrapped projections' names."""
    targets = _resolve_targets(model, config.target_modules)
    to_save = _match_saved(model, config.modules_to_save)
    _wrap(model, {n: (config.r, config.alpha) for n in targets}, to_save, config.dropout, config.rslora)
    return targets


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Counts of trainable and all parameters (a tied weight counted once)."""
    params = list(model.parameters())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (lora_A, lora_B, and the modules_to_save copies), our names."""
    return {k: v for k, v in model.state_dict().items()
            if re.search(r"\.(lora_A|lora_B|modules_to_save)\.", k)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: every adapter off (merged ones unmerged) inside the block, each layer's
    own state restored on exit, also on an exception; nesting is safe."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m for _, m in saved_modules(model)]
    before = [(m.disabled, m.merged) for m in layers], [m.disabled for m in saved]
    try:
        for m in layers:
            m.unmerge()
            m.disabled = True
        for m in saved:
            m.disabled = True
        yield model
    finally:
        for m, (disabled, merged) in zip(layers, before[0]):
            m.disabled = disabled
            if merged:
                m.merge()
        for m, disabled in zip(saved, before[1]):
            m.disabled = disabled


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its weight in place (forward unchanged, faster)."""
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: Transformer) -> Transformer:
    """A plain Transformer, in place: adapters merged into nn.Linear layers, modules_to_save replaced by
    their trained copies. An lm_head that no longer equals the embedding is untied
    (config.tie_word_embeddings = False); GPT-2 has no untied layout, so that is an error there."""
    for name, m in list(lora_layers(model)):
        if m.disabled:
            raise LoRAError(f"{name}: adapters are disabled; merge outside disable_adapters")
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        if m.shares_weight and not m.merged:
            linear.weight = nn.Parameter(m.weight + m.delta_weight().to(m.weight.dtype), requires_grad=False)
        else:
            m.merge()
            linear.weight = m.weight
        linear.bias = m.bias
        _set_module(model, name, linear)
    for name, m in list(saved_modules(model)):
        _set_module(model, name, m.modules_to_save)
    head = model.lm_head
    if model.config.tie_word_embeddings and head is not None and head.weight is not model.embed_tokens.weight:
        if model.config.is_gpt2:
            raise LoRAError("gpt2 ties lm_head to the token embedding; an adapted or saved lm_head cannot "
                            "be written as a gpt2 checkpoint (leave lm_head out of the adapter)")
        model.config.tie_word_embeddings = False
    return model


# --------------------------------------------------------------------------------------------------
# HF names


def hf_module_name(name: str, model: Transformer) -> str | None:
    """Our module name -> the transformers one (gpt2's q/k/v all map to the fused attn.c_attn);
    None for a module HF has no counterpart of."""
    if name == "lm_head":
        return name
    if not model.config.is_gpt2:
        return "model." + name
    if name in GPT2_TOP_NAMES.values():
        return "transformer." + {v: k for k, v in GPT2_TOP_NAMES.items()}[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        return None
    layer, module = m.groups()
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.h.{layer}.attn.c_attn"
    block = {v: k for k, v in GPT2_BLOCK_NAMES.items()}
    return f"transformer.h.{layer}.{block[module]}" if module in block else None


def _hf_linears(model: Transformer) -> dict[str, list[str]]:
    """HF projection name -> our projection names (one, or gpt2's q, k, v for c_attn)."""
    out: dict[str, list[str]] = {}
    for name in _plain_linears(model):
        hf = hf_module_name(name, model)
        if hf is not None:
            out.setdefault(hf, []).append(name)
    return out


def _peft_matches(hf_name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a list entry matches a module named it or ending in '.' + it; a string is a regex
    over the whole name ('all-linear' is handled by the caller)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_name) is not None
    return any(hf_name == t or hf_name.endswith("." + t) for t in targets)


def _pattern_value(hf_name: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return default


def _short_targets(hf_names: list[str], table: dict[str, list[str]]) -> list[str]:
    """The shortest PEFT target list selecting exactly hf_names: module suffixes ('q_proj',
    'attn.c_proj') when they select exactly these modules, else the full names."""
    depth = 2 if any(n.startswith("transformer.") for n in hf_names) else 1
    suffixes = sorted({".".join(n.split(".")[-depth:]) for n in hf_names})
    if {n for n in table if _peft_matches(n, suffixes)} == set(hf_names):
        return suffixes
    return sorted(hf_names)


# --------------------------------------------------------------------------------------------------
# Save


def peft_state_dict(model: Transformer) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """The adapter as PEFT names its tensors, and each adapted HF module's (r, alpha).

    GPT-2's q/k/v adapters of one layer become one c_attn adapter (see the module docstring):
    A = cat(A_q, A_k, A_v): [r_q + r_k + r_v, in]; B = diag(B_q s_q/s, B_k s_k/s, B_v s_v/s): [3 out, sum r],
    with s the fused adapter's scale, chosen equal to s_q so that B's blocks are unscaled when all agree.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    layers = dict(lora_layers(model))
    for hf, ours in _hf_linears(model).items():
        parts = [(n, layers[n]) for n in ours if n in layers]
        if not parts:
            continue
        key = PEFT_PREFIX + hf
        if len(ours) == 1:
            m = parts[0][1]
            tensors[key + ".lora_A.weight"] = m.lora_A.weight.detach()
            tensors[key + ".lora_B.weight"] = m.lora_B.weight.detach()
            ranks[hf] = (m.r, m.alpha)
            continue
        rslora = parts[0][1].rslora
        r = sum(m.r for _, m in parts)
        s = parts[0][1].scaling
        alpha = s * (math.sqrt(r) if rslora else r)
        A = torch.cat([m.lora_A.weight.detach() for _, m in parts])
        width = model.get_submodule(ours[0]).out_features
        B = A.new_zeros(width * len(ours), r)
        col = 0
        for name, m in parts:
            row = ours.index(name) * width
            B[row:row + width, col:col + m.r] = m.lora_B.weight.detach() * (m.scaling / s)
            col += m.r
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = A, B
        ranks[hf] = (r, alpha)
    for name, m in saved_modules(model):
        hf = hf_module_name(name, model)
        if hf is None:
            raise LoRAError(f"modules_to_save: {name} has no transformers counterpart to save it under")
        for pname, p in m.modules_to_save.named_parameters():
            tensors[f"{PEFT_PREFIX}{hf}.{pname}"] = p.detach()
    return tensors, ranks


def save_adapter(model: Transformer, out_dir: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout."""
    layers = dict(lora_layers(model))
    if not layers and not any(True for _ in saved_modules(model)):
        raise LoRAError("the model has no adapters to save (call inject_lora or load_adapter first)")
    for attr in ("rslora", "dropout_p"):
        values = {getattr(m, attr) for m in layers.values()}
        if len(values) > 1:
            raise LoRAError(f"PEFT stores one {attr} per adapter; the layers disagree: {sorted(values)}")
    tensors, ranks = peft_state_dict(model)
    counts = Counter(ranks.values())  # the most common (r, alpha) is the default, ties to the lower rank
    r, alpha = max(counts, key=lambda ra: (counts[ra], -ra[0])) if ranks else (8, 16.0)
    first = next(iter(layers.values()), None)
    table = _hf_linears(model)
    adapted = list(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout_p if first else 0.0,
        "use_rslora": first.rslora if first else False,
        "target_modules": _short_targets(adapted, table) if adapted else [],
        "modules_to_save": sorted(hf_module_name(n, model) for n, _ in saved_modules(model)) or None,
        "rank_pattern": {re.escape(k): v[0] for k, v in ranks.items() if v[0] != r},
        "alpha_pattern": {re.escape(k): v[1] for k, v in ranks.items() if v[1] != alpha},
        "bias": "none",
        "fan_in_fan_out": model.config.is_gpt2,  # GPT-2's Conv1D layout; PEFT sets it so itself
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors({k: v.cpu().contiguous() for k, v in tensors.items()}, out / ADAPTER_WEIGHTS,
                     metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# Load


def _read_adapter_config(adapter_dir: Path) -> dict:
    file = adapter_dir / ADAPTER_CONFIG
    if not file.exists():
        raise LoRAError(f"{adapter_dir} is not an adapter directory: it has no {ADAPTER_CONFIG}")
    cfg = json.loads(file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise LoRAError(f"{file}: task_type is {cfg['task_type']!r}; expected 'CAUSAL_LM'")
    unsupported = {
        "bias": cfg.get("bias", "none") != "none",
        "use_dora": bool(cfg.get("use_dora")),
        "lora_bias": bool(cfg.get("lora_bias")),
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "layer_replication": cfg.get("layer_replication") is not None,
        "target_parameters": bool(cfg.get("target_parameters")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
        "exclude_modules": bool(cfg.get("exclude_modules")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise LoRAError(f"{file}: unsupported settings: {', '.join(f'{k}={cfg[k]!r}' for k in bad)}")
    return cfg


def _adapter_plan(model: Transformer, cfg: dict) -> tuple[dict[str, tuple[int, float]], list[str]]:
    """From an adapter config: our targets with their (r, alpha), and our names of modules_to_save."""
    table = _hf_linears(model)
    targets = cfg.get("target_modules") or []
    if targets == "all-linear":
        hf_targets = [n for n in table if n != "lm_head"]
    else:
        hf_targets = [n for n in table if _peft_matches(n, targets)]
    ranks = {}
    for hf in hf_targets:
        r = _pattern_value(hf, cfg.get("rank_pattern") or {}, cfg["r"])
        alpha = _pattern_value(hf, cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
        for name in table[hf]:
            ranks[name] = (int(r), float(alpha))
    hf_of = {hf_module_name(n, model): n for n, _ in model.named_modules() if n}
    hf_of.pop(None, None)
    to_save = []
    for want in cfg.get("modules_to_save") or []:
        hits = [ours for hf, ours in hf_of.items() if hf == want or hf.endswith("." + want)]
        if not hits:
            raise LoRAError(f"adapter modules_to_save names {want!r}, which this "
                            f"{model.config.model_type} model does not have")
        to_save += hits
    return ranks, to_save


def _check_same_adapter(model: Transformer, ranks: dict[str, tuple[int, float]], to_save: list[str],
                        cfg: dict, where: Path) -> None:
    layers = dict(lora_layers(model))
    problems = []
    if set(layers) != set(ranks):
        if set(ranks) - set(layers):
            problems.append(f"adapter targets missing in the model: {sorted(set(ranks) - set(layers))}")
        if set(layers) - set(ranks):
            problems.append(f"model LoRA layers not in the adapter: {sorted(set(layers) - set(ranks))}")
    for name in sorted(set(layers) & set(ranks)):
        m, (r, alpha) = layers[name], ranks[name]
        if (m.r, m.alpha) != (r, alpha):
            problems.append(f"{name}: model has r={m.r}, alpha={m.alpha:g}; adapter r={r}, alpha={alpha:g}")
    for name, m in list(layers.items())[:1]:
        if m.rslora != bool(cfg.get("use_rslora")):
            problems.append(f"use_rslora: model {m.rslora}, adapter {bool(cfg.get('use_rslora'))}")
        if m.dropout_p != float(cfg.get("lora_dropout", 0.0)):
            problems.append(f"lora_dropout: model {m.dropout_p}, adapter {cfg.get('lora_dropout')}")
    have = {n for n, _ in saved_modules(model)}
    if have != set(to_save):
        problems.append(f"modules_to_save: model {sorted(have)}, adapter {sorted(to_save)}")
    if problems:
        raise LoRAError(f"{where / ADAPTER_CONFIG} does not match the model's adapters: " + "; ".join(problems))


def load_adapter(model: Transformer, adapter_dir: str | Path) -> Transformer:
    """Load a PEFT-layout LoRA adapter into `model`, in place, and return it.

    A model without adapters gets them injected as the adapter's config says; a model that has them
    must match that config (targets, r, alpha, rslora, dropout, modules_to_save). Every tensor is
    checked: missing or unexpected keys and wrong shapes are errors that name them.
    """
    adapter_dir = Path(adapter_dir)
    cfg = _read_adapter_config(adapter_dir)
    ranks, to_save = _adapter_plan(model, cfg)
    if not ranks and not to_save:
        raise LoRAError(f"{adapter_dir / ADAPTER_CONFIG}: target_modules {cfg.get('target_modules')!r} "
                        f"select no module of this {model.config.model_type} model; its projections: "
                        f"{', '.join(sorted({n.split('.')[-1] for n in _hf_linears(model)}))}")
    if not any(True for _ in lora_layers(model)) and not any(True for _ in saved_modules(model)):
        _wrap(model, ranks, to_save, float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora")))
    else:
        ranks = _fold_fused_ranks(model, ranks, bool(cfg.get("use_rslora")))
        _check_same_adapter(model, ranks, to_save, cfg, adapter_dir)

    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise LoRAError(f"{adapter_dir / 'adapter_model.bin'}: pickled adapters are never loaded (unpickling "
                            f"can run code); convert it to {ADAPTER_WEIGHTS} first, e.g. with peft on a machine "
                            f"where you trust the file")
        raise LoRAError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    state = dict(read_tensors(file))  # a truncated or corrupt file is a CheckpointError naming it
    _assign_peft_state(model, state, file)
    return model


def _fold_fused_ranks(model: Transformer, ranks: dict[str, tuple[int, float]],
                      rslora: bool) -> dict[str, tuple[int, float]]:
    """For a model that already has gpt2 q/k/v adapters: a c_attn adapter of rank r_q + r_k + r_v (the
    block-diagonal layout that peft_state_dict writes) counts as those adapters, not as three of rank
    r_q + r_k + r_v."""
    layers = dict(lora_layers(model))
    ranks = dict(ranks)
    for ours in _hf_linears(model).values():
        parts = [n for n in ours if n in layers]
        if len(ours) == 1 or not parts or not all(n in ranks for n in ours):
            continue
        r_f, alpha_f = ranks[ours[0]]
        s_f = alpha_f / (math.sqrt(r_f) if rslora else r_f)
        if (sum(layers[n].r for n in parts) == r_f and any(layers[n].r != r_f for n in parts)
                and math.isclose(s_f, layers[parts[0]].scaling, rel_tol=1e-6)):
            for n in ours:
                del ranks[n]
            for n in parts:
                ranks[n] = (layers[n].r, layers[n].alpha)
    return ranks


@torch.no_grad()
def _assign_peft_state(model: Transformer, state: dict[str, torch.Tensor], file: Path) -> None:
    """Copy PEFT-named tensors into our adapters.

    GPT-2's c_attn A: [r_f, in], B: [3 out, r_f] goes to q, k, v either as r_f-rank adapters sharing A
    (each takes its rows of B), or, when their ranks add up to r_f, as the blocks of the
    block-diagonal layout (A's rows and B's diagonal block, rescaled by s_f / s_p, where
    s_f = alpha_f / r_f is read back from the fused layer's rank and alpha as saved)."""
    layers = dict(lora_layers(model))
    saved = {f"{PEFT_PREFIX}{hf_module_name(name, model)}.{pname}": p
             for name, m in saved_modules(model) for pname, p in m.modules_to_save.named_parameters()}
    fused = {PEFT_PREFIX + hf: [(n, layers.get(n)) for n in ours]
             for hf, ours in _hf_linears(model).items() if any(n in layers for n in ours)}
    expected = set(saved) | {k + s for k in fused for s in (".lora_A.weight", ".lora_B.weight")}
    # PEFT may keep the adapter name in old files: ...lora_A.default.weight
    state = {re.sub(r"\.(lora_A|lora_B)\.default\.weight$", r".\1.weight", k): v for k, v in state.items()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        raise LoRAError(f"{file}: " + "; ".join(
            ([f"missing keys: {show(missing)}"] if missing else [])
            + ([f"unexpected keys: {show(unexpected)}"] if unexpected else [])))

    def put(param: torch.Tensor, src: torch.Tensor, key: str) -> None:
        if src.shape != param.shape:
            raise LoRAError(f"{file}: {key} gives a tensor of shape {tuple(src.shape)} where the model "
                            f"expects {tuple(param.shape)}")
        param.copy_(src)

    for key, p in saved.items():
        put(p, state[key], key)
    for key, parts in fused.items():
        A, B = state[key + ".lora_A.weight"], state[key + ".lora_B.weight"]
        if len(parts) == 1:
            put(parts[0][1].lora_A.weight, A, key + ".lora_A.weight")
            put(parts[0][1].lora_B.weight, B, key + ".lora_B.weight")
            continue
        width = B.shape[0] // len(parts)
        adapted = [(i, m) for i, (_, m) in enumerate(parts) if m is not None]
        if all(m.r == A.shape[0] for _, m in adapted):  # shared A, B split by rows
            for i, m in adapted:
                put(m.lora_A.weight, A, key + ".lora_A.weight")
                put(m.lora_B.weight, B[i * width:(i + 1) * width], key + ".lora_B.weight")
            continue
        if sum(m.r for _, m in adapted) != A.shape[0]:
            raise LoRAError(f"{file}: {key}.lora_A.weight has rank {A.shape[0]}; the model's q/k/v adapters "
                            f"have ranks {[m.r for _, m in adapted]} (neither each nor in sum)")
        s_f = adapted[0][1].scaling  # _fold_fused_ranks checked that the file's fused scale is this
        rest = B.clone()
        col = 0
        for i, m in adapted:
            rows, cols = slice(i * width, (i + 1) * width), slice(col, col + m.r)
            put(m.lora_A.weight, A[cols], key + ".lora_A.weight")
            put(m.lora_B.weight, B[rows, cols] * (s_f / m.scaling), key + ".lora_B.weight")
            rest[rows, cols] = 0
            col += m.r
        if rest.abs().max() > 0:
            raise LoRAError(f"{file}: {key}.lora_B.weight is not block-diagonal over q, k, v, so it does not "
                            f"split into this model's q/k/v adapters; load it into a model without adapters")


# --------------------------------------------------------------------------------------------------
# Merge to a full model


def merge_and_save(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Base model + adapter -> a full HF-format model in out_dir (as PEFT's merge_and_unload followed
    by save_pretrained), with the tokenizer files of the adapter dir, else of the base dir."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    model = Transformer.from_pretrained(base_dir, dtype=dtype)
    load_adapter(model, adapter_dir)
    merge_and_unload(model).save_pretrained(out_dir)
    for fname in TOKENIZER_FILES:
        for src in (adapter_dir / fname, base_dir / fname):
            if src.is_file():
                shutil.copy2(src, out_dir / fname)
                break
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minirlhf.lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter into its base model and save a full HF-format model")
    merge.add_argument("--base", required=True, help="base model directory (HF format)")
    merge.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="load (and save) in this dtype; default: as stored")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = merge_and_save(args.base, args.adapter, args.out, dtype=dtype)
    print(f"merged {args.adapter} into {args.base} -> {out}")


if __name__ == "__main__":
    main()
