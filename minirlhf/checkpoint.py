"""Hugging Face-format model directories: config.json + (sharded) safetensors, in and out.

Loading builds the model on the meta device (no memory), then reads one tensor at a time from the
safetensors files and assigns it in place, so the weights exist once in memory, never twice.

Name maps: the llama family's HF names are ours with a "model." prefix; GPT-2's differ more and its
`Conv1D` weights are stored transposed ([in, out]), with q, k and v fused in one `c_attn`.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minirlhf.errors import UserError
from minirlhf.model import FAMILIES, ModelConfig, Transformer, rope_inv_freq


class CheckpointError(UserError):
    """A model directory that cannot be read or does not match the model."""


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# HF config keys that we derive ourselves on save, so they are not carried through from a loaded config
_DERIVED_KEYS = {
    "rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "transformers_version",
    "architectures", "attention_bias", "mlp_bias", "hidden_act", "activation_function", "n_ctx", "n_inner",
}


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


# the sizes a config.json gives as positive integers: our name -> the HF keys that may hold it
_SIZES = {
    "vocab_size": ("vocab_size",), "hidden_size": ("hidden_size", "n_embd"),
    "intermediate_size": ("intermediate_size", "n_inner"), "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"), "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",), "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Read an HF config dict of either generation (rope under `rope_parameters` or at the top).
    A missing or ill-typed key, or sizes that do not fit together, raise CheckpointError naming `source`."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    try:
        fields = _model_config_fields(hf, model_type)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing key {e.args[0]!r} (needed by a {model_type} model)") from None
    except (ValueError, TypeError) as e:  # e.g. a rope_theta that is not a number
        raise CheckpointError(f"{source}: {e}") from None
    for name, keys in _SIZES.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            key = next((k for k in keys if k in hf), keys[0])
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    try:
        config = ModelConfig(**fields)
        if not config.is_gpt2:
            rope_inv_freq(config, torch.ones(1, dtype=torch.long))  # an unknown or incomplete rope_scaling
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config


def _model_config_fields(hf: dict, model_type: str) -> dict:
    """ModelConfig's fields from an HF config; KeyError names a required key that is missing."""
    def pick(*names):
        for n in names:
            if hf.get(n) is not None:
                return hf[n]
        raise KeyError(names[0])

    common = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        extra={k: v for k, v in hf.items() if k not in _DERIVED_KEYS},
    )
    if model_type == "gpt2":
        d = pick("n_embd", "hidden_size")
        return dict(
            hidden_size=d,
            intermediate_size=hf.get("n_inner") or (4 * d if isinstance(d, int) else d),
            num_hidden_layers=pick("n_layer", "num_hidden_layers"),
            num_attention_heads=pick("n_head", "num_attention_heads"),
            max_position_embeddings=pick("n_positions", "max_position_embeddings"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            **common,
        )
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        **common,
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json that transformers reads back as the same architecture."""
    c = config
    hf = dict(c.extra)
    hf.update(
        architectures=[ARCHITECTURES[c.model_type]],
        model_type=c.model_type,
        vocab_size=c.vocab_size,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        initializer_range=c.initializer_range,
        torch_dtype=str(dtype).removeprefix("torch."),
        tie_word_embeddings=c.tie_word_embeddings,
    )
    if c.is_gpt2:
        hf.update(n_embd=c.hidden_size, n_inner=c.intermediate_size, n_layer=c.num_hidden_layers,
                  n_head=c.num_attention_heads, n_positions=c.max_position_embeddings,
                  n_ctx=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
                  activation_function="gelu_new")
        return hf
    if c.model_type == "qwen2" and not (c.qkv_bias and not c.o_bias):
        raise CheckpointError("qwen2 checkpoints have q/k/v biases and no o_proj bias")
    if c.model_type == "mistral" and (c.qkv_bias or c.o_bias or c.mlp_bias):
        raise CheckpointError("mistral checkpoints have no biases")
    if c.model_type == "llama" and c.qkv_bias != c.o_bias:
        raise CheckpointError("llama's attention_bias covers q, k, v and o alike")
    hf.update(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling, hidden_act="silu",
    )
    if c.model_type == "llama":
        hf.update(attention_bias=c.o_bias, mlp_bias=c.mlp_bias)
    if c.model_type == "mistral":
        hf.update(sliding_window=c.sliding_window)
    return hf


# --------------------------------------------------------------------------------------------------
# tensor names


GPT2_BLOCK_NAMES = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
GPT2_TOP_NAMES = {"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "norm"}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hf_to_ours(name: str, tensor: torch.Tensor, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one HF tensor to ours (GPT-2's fused c_attn gives three). Yields nothing for tensors we
    rebuild ourselves (GPT-2's causal-mask buffers, a tied lm_head)."""
    if not config.is_gpt2:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return
        yield name.removeprefix("model."), tensor
        return
    name = name.removeprefix("transformer.")
    if name == "lm_head.weight" or re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
        return  # tied head, and old checkpoints' causal-mask buffers
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        top, _, kind = name.partition(".")
        yield f"{GPT2_TOP_NAMES.get(top, top)}.{kind}", tensor
        return
    layer, module, kind = m.groups()
    if module in _GPT2_CONV1D and kind == "weight":
        tensor = tensor.t()  # Conv1D stores [in, out]; nn.Linear wants [out, in]
    prefix = f"layers.{layer}."
    if module == "attn.c_attn":
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            yield f"{prefix}self_attn.{proj}.{kind}", part.contiguous()
        return
    yield f"{prefix}{GPT2_BLOCK_NAMES.get(module, module)}.{kind}", tensor.contiguous()


def ours_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict as HF names and layouts (a tied lm_head is left out, as HF does)."""
    out: dict[str, torch.Tensor] = {}
    if not config.is_gpt2:
        for name, t in state.items():
            if name == "lm_head.weight":
                if not config.tie_word_embeddings:
                    out[name] = t
            else:
                out["model." + name] = t
        return out
    to_hf_block = {v: k for k, v in GPT2_BLOCK_NAMES.items()}
    to_hf_top = {v: k for k, v in GPT2_TOP_NAMES.items()}
    fused: dict[str, list[torch.Tensor]] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            top, _, kind = name.partition(".")
            out[f"transformer.{to_hf_top[top]}.{kind}"] = t
            continue
        layer, module, kind = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"transformer.h.{layer}.attn.c_attn.{kind}", []).append((module, t))
            continue
        hf_module = to_hf_block[module]
        if hf_module in _GPT2_CONV1D and kind == "weight":
            t = t.t()
        out[f"transformer.h.{layer}.{hf_module}.{kind}"] = t.contiguous()
    order = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
    for name, parts in fused.items():
        t = torch.cat([t for _, t in sorted(parts, key=lambda part: order[part[0]])], dim=0)
        out[name] = (t.t() if name.endswith("weight") else t).contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# load


def read_json_object(file: Path) -> dict:
    """A JSON object file of a model directory (config.json, an index); CheckpointError naming the file
    when it cannot be read, is not UTF-8 or not JSON, or holds something other than an object."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object from tensor names to shard files")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        raise CheckpointError(
            f"{path / pickled[0]}: pickled weights are never loaded (unpickling can run code); convert the "
            f"directory to safetensors first, e.g. transformers' AutoModel.from_pretrained(dir)"
            f".save_pretrained(out_dir) on a machine where you trust the file"
        )
    raise CheckpointError(
        f"{path}: no weights found (expected model.safetensors, or model.safetensors.index.json with its shards)"
    )


@contextmanager
def _safetensors(file: Path) -> Iterator:
    """safe_open, with a file that is not readable safetensors (truncated, corrupt, a folder, no
    permission) turned into a CheckpointError naming it, whether it fails on opening or on a read."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"{file}: not a readable safetensors file ({reason})") from None


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time, memory-mapped."""
    with _safetensors(file) as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a model directory (it does not exist or is a file)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} is not a model directory: it has no config.json")
    return config_from_hf(read_json_object(cfg_file), source=str(cfg_file))


def read_weights(path: Path, model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype | None = None,
                 device=None, allowed_extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Read a directory's tensors under our names, checking each against `model`'s (meta) state.

    Returns (state for model.load_state_dict, extra tensors named in allowed_extra, by HF name).
    """
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        for hf_name, tensor in read_tensors(file):
            if hf_name in allowed_extra:
                extra[hf_name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                continue
            for name, t in hf_to_ours(hf_name, tensor, config):
                if name == "lm_head.weight" and name not in expected:
                    continue  # a causal LM's head, unused by a backbone without one (reward model)
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {hf_name!r} for a {config.model_type} model")
                if tuple(t.shape) != tuple(expected[name]):
                    raise CheckpointError(
                        f"{file}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                        f"the config implies {tuple(expected[name])}"
                    )
                if not t.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {hf_name!r} holds {t.dtype} values; model weights "
                                          f"are floating point (quantized checkpoints are not read)")
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    if config.tie_word_embeddings and "embed_tokens.weight" in state and "lm_head.weight" in expected:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    return state, extra


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """Build on the meta device, then assign each checkpoint tensor (converted to dtype / device)."""
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    state, _ = read_weights(path, model, config, dtype, device)
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter
    return model


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype of a directory's first stored tensor, from the safetensors header (no tensor is read)."""
    file = _weight_files(Path(path))[0]
    with _safetensors(file) as f:
        names = list(f.keys())
        if not names:
            raise CheckpointError(f"{file}: holds no tensors")
        code = f.get_slice(names[0]).get_dtype()  # "F32", "BF16", ...
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: unsupported tensor dtype {code!r} for a model weight")
    return _SAFETENSORS_DTYPES[code]


def pretrained_skeleton(path: str | Path, dtype: torch.dtype | None = None) -> Transformer:
    """The model load_pretrained would return, on the meta device and without reading any weight: what
    a torchrun rank other than 0 builds before distributed.prepare_stage fills it from rank 0's copy."""
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    return model.to(dtype or checkpoint_dtype(path))


# --------------------------------------------------------------------------------------------------
# save


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as HF uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if m is None:
        raise ValueError(f"cannot read shard size {size!r} (examples: '5GB', '200MB', 1000000)")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
                     ) -> None:
    """safetensors' save_file, with the file's permissions set by the umask as open() would (save_file
    writes through a private temporary file, 0600 whatever the umask)."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """config.json plus model.safetensors, or shards and model.safetensors.index.json when larger."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    adapter_keys = [k for k in state if ".lora_" in k or ".original_module." in k or ".modules_to_save." in k]
    if adapter_keys:
        raise CheckpointError(
            f"the model still carries LoRA adapters ({adapter_keys[0]}, ...): save them with "
            "minirlhf.lora.save_adapter, or merge first with minirlhf.lora.merge_and_unload"
        )
    tensors = ours_to_hf(state, model.config)
    dtype = next(iter(tensors.values())).dtype
    write_model_dir(path, config_to_hf(model.config, dtype), tensors, max_shard_size)


def write_model_dir(path: str | Path, hf_config: dict, tensors: dict[str, torch.Tensor],
                    max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the tensors (HF names), sharded past max_shard_size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_safetensors(shards[0], path / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, path / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
