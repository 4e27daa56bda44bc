"""Low-rank adapters (LoRA, Hu et al. 2021) on our Transformer: the layers, injecting them, merging them.

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

On disk an adapter is PEFT's (minirlhf/peft.py). `python -m minirlhf.lora merge ...` is the older spelling of
`minirlhf merge`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from minirlhf import kernels
from minirlhf.errors import UserError
from minirlhf.model import Transformer

# the projections of minirlhf.model.Transformer that LoRA may wrap ([lora] target_modules)
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


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
        """x: [..., in] -> [..., out].

        Under autocast x is cast to the autocast dtype here, once for both branches: autocast itself would
        cast it for the base matmul and again for lora_A (it caches the casts of weights, not of inputs),
        and in eager mode that second [..., in] cast is a visible share of a LoRA block's time. The
        roundings are the ones autocast makes, so the numbers are PEFT's bit for bit (tests/test_lora.py).
        """
        fresh = x
        compute = kernels.autocast_dtype(x.device.type)
        if compute is not None and x.dtype != torch.float64:  # autocast leaves float64 alone
            x = x.to(compute)
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        if self.training and self.dropout_p > 0:
            h = self.lora_dropout(fresh)  # the mask and 1/(1-p) on the input as it came, as without the cast
        else:
            h = x
        if compute is None:
            h = h.to(self.lora_A.weight.dtype)  # a bf16/fp16 base: the float32 adapter computes in float32
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


def plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Our projections by name: every nn.Linear that is not part of an adapter."""
    out = {}
    for name, m in model.named_modules():
        adapter_part = re.search(r"(^|\.)(lora_A|lora_B|modules_to_save|original_module)(\.|$)", name)
        if isinstance(m, nn.Linear) and not adapter_part:
            out[name] = m
    return out


def _resolve_targets(model: Transformer, target_modules: str | Sequence[str]) -> list[str]:
    """Our module names that the targets select; 'all-linear' = every block projection (no lm_head)."""
    linears = plain_linears(model)
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


def wrap(model: Transformer, ranks: dict[str, tuple[int, float]], to_save: Sequence[str],
          dropout: float, rslora: bool) -> None:
    """Freeze the model; wrap each named projection in LoRALinear with its (r, alpha), and each of
    to_save in ModulesToSave."""
    if has_lora(model):
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
    wrap(model, {n: (config.r, config.alpha) for n in targets}, to_save, config.dropout, config.rslora)
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


# a state-dict key of an adapter's own tensor: lora_A, lora_B, or a modules_to_save copy
_ADAPTER_KEY = re.compile(r"(^|\.)(lora_A|lora_B|modules_to_save)\.")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (lora_A, lora_B, and the modules_to_save copies), our names."""
    return {k: v for k, v in model.state_dict().items() if _ADAPTER_KEY.search(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with inside `disable_adapters`, under the names they have in a model
    without adapters: the adapters' own tensors left out, a modules_to_save original under its plain name."""
    return {k.replace(".original_module", ""): v for k, v in model.state_dict().items() if not _ADAPTER_KEY.search(k)}


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


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m minirlhf.lora merge --base B --adapter A --out O [--dtype D]`: peft.merge_and_save (the older
    spelling of `minirlhf merge`, which also finds the base from the adapter and refuses a non-empty --out)."""
    from minirlhf.peft import merge_and_save

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
