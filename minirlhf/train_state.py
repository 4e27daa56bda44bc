"""Training state on disk without pickle: a tree of dicts, lists, numbers, strings and tensors, written
as JSON with its tensors in a safetensors file next to it.

`torch.load` of a pickle runs whatever code the file names, so a checkpoint folder downloaded or
crafted by someone else would be a program. JSON and safetensors are data only: reading them executes
nothing, whatever their content.

    save_tree(tree, folder, "state")   ->  folder/state.json + folder/state.safetensors
    load_tree(folder, "state")         ->  an equal tree

In the JSON, a tensor is {"__tensor__": key} (its key in the safetensors file), a tuple is
{"__tuple__": [...]}, and a dict with int keys (the optimizer's per-parameter state) is
{"__int_keys__": {"0": ...}}; every other value is itself. Any other kind of object is refused when
saving, so what loads is exactly what was saved.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from minirlhf.checkpoint import save_safetensors

TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {INT_KEYS: {str(k): _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}}
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"train_state: {key}: dict keys must be all str or all int, got {list(value)[:5]}")
        if value.keys() & {TENSOR, TUPLE, INT_KEYS}:
            raise TypeError(f"train_state: {key}: a key collides with the format's markers")
        return {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"train_state: {key}: cannot store a {type(value).__name__} (only tensors, dicts, lists, "
                    f"tuples, numbers, strings, None)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if INT_KEYS in value:
        return {int(k): _decode(v, tensors) for k, v in value[INT_KEYS].items()}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_tree(tree: dict[str, Any], folder: Path, name: str) -> list[Path]:
    """Write `tree` as folder/name.json (+ folder/name.safetensors when it holds tensors); returns the files."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    files = [folder / f"{name}.json"]
    files[0].write_text(json.dumps(encoded))
    if tensors:
        files.append(folder / f"{name}.safetensors")
        save_safetensors(tensors, files[1])
    return files


def load_tree(folder: Path, name: str) -> dict[str, Any]:
    """The tree save_tree wrote. Raises ValueError (bad JSON, a missing tensor), OSError, or safetensors'
    error for a corrupt tensor file."""
    encoded = json.loads((folder / f"{name}.json").read_text())
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.exists() else {}
    try:
        return _decode(encoded, tensors)
    except KeyError as e:
        raise ValueError(f"{tensor_file}: no tensor {e}") from None


# --------------------------------------------------------------------------------------------------
# RNG states in that form


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as a tree save_tree stores: python's (version, 625 ints, gauss), numpy's
    MT19937 (key as a list of ints), torch's and CUDA's (uint8 tensors)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, [int(k) for k in key], int(pos), int(has_gauss),
                                                     float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
