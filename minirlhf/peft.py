"""LoRA adapters (minirlhf/lora.py) on disk in PEFT's layout.

An adapter directory holds adapter_config.json plus adapter_model.safetensors with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (HF module names, no adapter name), so
`peft.PeftModel.from_pretrained` reads ours (`save_adapter`) and `load_adapter` reads PEFT's.

GPT-2: HF fuses q, k and v into one `c_attn` projection. Separate q/k/v adapters are exported exactly as
one rank-(r_q + r_k + r_v) adapter on c_attn: A = [A_q; A_k; A_v] stacked, B block-diagonal
diag(B_q, B_k, B_v) (the rank and alpha go in PEFT's `rank_pattern` / `alpha_pattern`). Loaded into a
model that already has those q/k/v adapters, the blocks come back as they were; loaded into a model
without adapters (or from PEFT's own c_attn adapters), q, k and v each get an adapter of c_attn's rank
that shares its A and takes its rows of B: the same function with a larger rank. In PEFT one dropout
mask feeds q, k and v, in ours each draws its own, which only matters in training.

`merge_and_save` writes base + adapter as one full model directory (`minirlhf merge`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from minirlhf.hf_checkpoint import GPT2_BLOCK_NAMES, GPT2_TOP_NAMES, read_tensors, save_safetensors
from minirlhf.lora import (
    LoRAError,
    LoRALinear,
    has_lora,
    lora_layers,
    merge_and_unload,
    plain_linears,
    saved_modules,
    wrap,
)
from minirlhf.model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# files that merge_and_save copies next to the merged weights (the adapter's own copies win)
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


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
    for name in plain_linears(model):
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
    if not has_lora(model):
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
    for m in list(layers.values())[:1]:
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
    if not has_lora(model):
        wrap(model, ranks, to_save, float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora")))
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
        else:
            _assign_fused(key, A, B, parts, put, file)


def _assign_fused(key: str, A: torch.Tensor, B: torch.Tensor, parts: list[tuple[str, LoRALinear | None]],
                  put: Callable[[torch.Tensor, torch.Tensor, str], None], file: Path) -> None:
    """One GPT-2 c_attn adapter (A: [r_f, in], B: [3 out, r_f]) into the model's q, k, v adapters (`parts`,
    None where one has none): shared A and B split by rows when each has rank r_f, else the blocks of the
    block-diagonal layout (see _assign_peft_state)."""
    width = B.shape[0] // len(parts)
    adapted = [(i, m) for i, (_, m) in enumerate(parts) if m is not None]
    if all(m.r == A.shape[0] for _, m in adapted):  # shared A, B split by rows
        for i, m in adapted:
            put(m.lora_A.weight, A, key + ".lora_A.weight")
            put(m.lora_B.weight, B[i * width:(i + 1) * width], key + ".lora_B.weight")
        return
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
