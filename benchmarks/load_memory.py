"""Peak memory of `Transformer.from_pretrained` on a ~0.5B-parameter llama: one copy of the weights.

A random llama (28 layers, hidden 1024, vocab 32000: 0.535B parameters) is saved in float32 with
`save_pretrained` to a temporary directory (2.14 GB of safetensors, deleted at the end). Each loader
then runs in a fresh Python process, which reads /proc/self/status: VmRSS before loading (after the
imports), VmRSS right after loading, and then, after reading every weight once (safetensors hands out
tensors mapped from the file, whose pages only become resident when touched), the high-water mark
VmHWM and the anonymous / file-backed split. The extra peak, VmHWM - VmRSS(before), is compared with
the checkpoint's bytes on disk: about 1x is one copy, 2x is two.

    ours       Transformer.from_pretrained: modules built on the meta device, each tensor read and
               assigned in place (minirlhf/hf_checkpoint.py, load_pretrained)
    naive      the two-copy baseline: Transformer(config) allocated (uninitialised, to save time), then
               load_state_dict(safetensors.torch.load_file(...)), measured in the same run
    hf         transformers' AutoModelForCausalLM.from_pretrained, for reference (--no-hf to skip)

The file was just written, so it sits in the page cache: times are for a warm cache (no disk reads).

    python benchmarks/load_memory.py [--dtype float32|bfloat16] [--no-hf] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import RESULTS, ROOT, append_rows, cpu_name, today, versions

# 28 * (4 * 1024^2 [q, k, v, o] + 3 * 1024 * 4096 [gate, up, down] + 2 * 1024 [norms])
# + 2 * 32000 * 1024 [embed_tokens, lm_head] + 1024 [norm] = 535.4M parameters
CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
          "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def child(mode: str, directory: str) -> None:
    """Runs in a fresh process: load the checkpoint one way, print the memory figures as JSON."""
    import torch

    sys.path.insert(0, str(ROOT))
    from minirlhf.model import Transformer

    if mode == "hf":
        import transformers  # imported before the baseline reading, like torch
    before = proc_status()
    t0 = time.perf_counter()
    if mode == "ours":
        model = Transformer.from_pretrained(directory)
    elif mode == "naive":
        from safetensors.torch import load_file

        from minirlhf.hf_checkpoint import read_config

        with torch.device("meta"):
            model = Transformer(read_config(directory))
        model.to_empty(device="cpu")  # allocated, not initialised (as torch.nn.utils.skip_init does)
        state = load_file(str(Path(directory) / "model.safetensors"))
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        del state
    elif mode == "hf":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - t0
    loaded = proc_status()
    with torch.no_grad():  # read every weight once, so that lazily mapped pages become resident
        checksum = sum(float(p.sum()) for p in model.parameters())
    after = proc_status()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"mode": mode, "seconds": seconds, "before": before, "loaded": loaded, "after": after,
                      "param_bytes": n_bytes, "checksum": checksum,
                      "dtype": str(next(model.parameters()).dtype)}))


def measure(mode: str, directory: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, directory],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/load_memory.py: the {mode} loader failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' loader")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    sys.path.insert(0, str(ROOT))
    from minirlhf.model import ModelConfig, Transformer

    GB = 1e9
    env_versions = versions("torch", "transformers")
    device = f"CPU {cpu_name()}, {Path('/proc/meminfo').read_text().split()[1]} kB RAM"
    rows = []
    with tempfile.TemporaryDirectory(prefix="minirlhf_load_memory_") as tmp:
        t0 = time.perf_counter()
        model = Transformer(ModelConfig(**CONFIG)).to(getattr(torch, args.dtype))
        n_params = model.num_parameters()
        model.save_pretrained(tmp)
        del model
        disk = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        print(f"{env_versions}; {device}")
        print(f"checkpoint: llama {n_params / 1e9:.3f}B params, {args.dtype}, {disk / GB:.2f} GB on disk "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        modes = ["ours", "naive"] + ([] if args.no_hf else ["hf"])
        results = {mode: measure(mode, tmp) for mode in modes}
    print(f"{'loader':8s} {'time':>7s} {'RSS before':>10s} {'after load':>10s} {'peak':>7s} {'extra peak':>10s} "
          f"{'x ckpt':>7s} {'anon':>7s} {'file':>7s}   (peak, anon, file: after reading every weight once)")
    for mode, r in results.items():
        extra = r["after"]["VmHWM"] - r["before"]["VmRSS"]
        r["extra"] = extra
        print(f"{mode:8s} {r['seconds']:6.2f}s {r['before']['VmRSS'] / GB:8.2f}GB {r['loaded']['VmRSS'] / GB:8.2f}GB "
              f"{r['after']['VmHWM'] / GB:5.2f}GB {extra / GB:8.2f}GB {extra / disk:6.2f}x "
              f"{r['after']['RssAnon'] / GB:5.2f}GB {r['after']['RssFile'] / GB:5.2f}GB")
    ours = results["ours"]
    for mode, r in results.items():
        ratio = "-" if mode == "ours" else (f"ours: {r['extra'] / ours['extra']:.2f}x less peak, "
                                            f"{r['seconds'] / ours['seconds']:.2f}x faster")
        rows.append([
            today(),
            (f"load checkpoint, {mode} ({'Transformer.from_pretrained' if mode == 'ours' else 'baseline'}), "
             "peak RSS in a fresh process"),
            f"llama {n_params / 1e9:.2f}B {args.dtype}, {disk / GB:.2f} GB safetensors, warm page cache",
            f"{r['seconds']:.2f} s",
            f"{disk / GB / r['seconds']:.2f} GB/s",
            ratio,
            f"peak +{r['extra'] / GB:.2f} GB = {r['extra'] / disk:.2f}x checkpoint",
            device,
            env_versions,
        ])
    if not args.no_append:
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
