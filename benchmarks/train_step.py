"""One sft training step (forward + backward + AdamW step), three ways, same weights and same batch.

    ours          Transformer + minirlhf.logprobs.causal_lm_loss (the fused LM-head cross-entropy
                  through minirlhf.kernels: Triton on CUDA, the chunked torch reference on CPU)
    transformers  LlamaForCausalLM(input_ids, labels=...) loaded from the directory our model saved
    plain         our Transformer, logits = model(ids), F.cross_entropy on the shifted logits

Each gets its own torch.optim.AdamW (fused on CUDA) over its own copy of the weights. The first step of
each side runs on the initial weights, so the three first-step losses must be the same number (to 1e-4,
float32 on CPU); then the median of `--steps` timed steps (after `--warmup`), the three sides
alternating step by step so that a change in the machine's load is shared by all three.

On CPU the time is the process's CPU time with one torch thread: the 2 cores of the test machines are
shared, and wall time (printed too) swings with the other jobs' load while single-thread CPU time does
not. On CUDA it is wall time between synchronisations, and a ~1B llama (TinyLlama's shape) also runs
with bf16 autocast: tokens/s and MFU = tokens/s * model.flops_per_token(T) / peak bf16 FLOP/s (dense,
from the PEAK_BF16 table below, matched against the device name).

    python benchmarks/train_step.py [--steps 10] [--warmup 2] [--batch 8] [--seq 256] [--no-append]

Prints ms/step and tokens/s per side and the ratios ours/transformers and ours/plain (as speedups, > 1
means ours is faster), and appends rows to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from results import RESULTS, ROOT, append_rows, cpu_name, today, versions

sys.path.insert(0, str(ROOT))
from minirlhf.logprobs import causal_lm_loss
from minirlhf.losses import IGNORE_INDEX
from minirlhf.model import ModelConfig, Transformer

SMALL = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4}
# TinyLlama-1.1B's shape
LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4}

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendor data sheets (SXM parts);
# matched as substrings of torch.cuda.get_device_name(), first match wins
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
VERSIONS = ("torch", "transformers", "python")  # the RESULTS.md versions column, in this order


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with sft-like labels: the first quarter of each row is "prompt" (label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def ours_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(model, batch)


def plain_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])  # (B, T, V)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def hf_loss(model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


class Side:
    """A model, its loss function and its AdamW; `step()` runs one training step and returns the loss."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable, batch: dict, autocast):
        self.name, self.model, self.loss_fn, self.batch, self.autocast = name, model, loss_fn, batch, autocast
        fused = next(model.parameters()).is_cuda
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                     fused=fused)
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def step(self) -> float:
        with self.autocast():
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_step(self) -> None:
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        self.step()
        sync()
        self.cpu.append(time.process_time() - c0)
        self.wall.append(time.perf_counter() - w0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_sides(shape: dict, batch_size: int, seq: int, device: torch.device, dtype: torch.dtype,
                autocast, tmp: Path, baselines: bool = True) -> list[Side]:
    """Ours and plain on two copies of one random Transformer, transformers on its saved directory
    (baselines=False: ours alone)."""
    torch.manual_seed(0)
    config = ModelConfig(model_type="llama", max_position_embeddings=max(seq, 512), bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, **shape)
    with torch.device(device):
        ours = Transformer(config).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():  # norms start at 1; make every weight random so a mix-up shows
            p.add_(torch.randn_like(p) * 0.02)
    ours.kernel_backend = "auto"
    batch = {k: v.to(device) for k, v in make_batch(batch_size, seq, shape["vocab_size"]).items()}
    sides = [Side("ours", ours, ours_loss, batch, autocast)]
    if baselines:
        with torch.device(device):
            plain = Transformer(config).to(dtype)
        plain.load_state_dict(ours.state_dict())
        sides.append(Side("plain", plain, plain_loss, batch, autocast))
        ours.save_pretrained(tmp / "model")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp / "model", dtype=dtype,
                                                           attn_implementation="sdpa").to(device)
        sides.insert(1, Side("transformers", hf, hf_loss, batch, autocast))
    for side in sides:
        side.model.train()
    return sides


def run(sides: list[Side], warmup: int, steps: int) -> list[float]:
    """First-step losses (on the shared initial weights), then warm-up and timed steps, alternating."""
    first = [float(s.step()) for s in sides]
    for _ in range(max(0, warmup - 1)):
        for s in sides:
            s.step()
    for _ in range(steps):
        for s in sides:
            s.timed_step()
    return first


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}, {torch.get_num_threads()} thread(s)"


def small_comparison(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        sides = build_sides(SMALL, args.batch, args.seq, device, torch.float32, nullcontext, Path(tmp))
        first = run(sides, args.warmup, args.steps)
    clock = "cpu" if device.type == "cpu" else "wall"
    n_params = sum(p.numel() for p in sides[0].model.parameters())
    print(f"\nsft step, llama {n_params / 1e6:.1f}M float32, B={args.batch} T={args.seq} on "
          f"{device_name(device)}; median of {args.steps} steps after {args.warmup} warm-up; "
          f"time = {'process CPU time' if clock == 'cpu' else 'wall time'}")
    med = {}
    for s, loss in zip(sides, first):
        t = statistics.median(s.cpu if clock == "cpu" else s.wall)
        w = statistics.median(s.wall)
        med[s.name] = (t, w)
        print(f"  {s.name:13s} first loss {loss:.6f}   {t * 1e3:8.1f} ms/step ({clock}; wall {w * 1e3:.1f})"
              f"   {tokens / t:9.0f} tokens/s")
    spread = max(first) - min(first)
    print(f"  first-step losses agree to {spread:.2e} ({'ok' if spread < 1e-4 else 'MISMATCH'} at 1e-4)")
    if spread >= 1e-4:
        losses = dict(zip([s.name for s in sides], first))
        raise SystemExit(f"first-step losses differ by {spread:.3e} (> 1e-4): {losses}")
    ratio_hf = med["transformers"][0] / med["ours"][0]
    ratio_plain = med["plain"][0] / med["ours"][0]
    print(f"  speedup ours vs transformers: {ratio_hf:.2f}x   ours vs plain: {ratio_plain:.2f}x   (>1 = ours faster)")
    date = today()
    shape = f"llama {n_params / 1e6:.1f}M fp32, B={args.batch}, T={args.seq}, V={SMALL['vocab_size']}"
    rows = []
    for base, ratio in (("transformers", ratio_hf), ("plain", ratio_plain)):
        t_o, w_o = med["ours"]
        t_b, w_b = med[base]
        what = f"sft train step (fwd+bwd+AdamW), ours (fused LM-head CE) vs {base}; first losses agree to {spread:.0e}"
        rows.append([date, what, shape,
                     f"{clock} {t_o * 1e3:.0f} vs {t_b * 1e3:.0f} ms (wall {w_o * 1e3:.0f} vs {w_b * 1e3:.0f})",
                     f"{tokens / t_o:.0f} vs {tokens / t_b:.0f} tok/s", f"{ratio:.2f}x", peak_memory(),
                     device_name(device), versions(*VERSIONS)])
    return rows


def _bf16_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def peak_flops(name: str) -> tuple[float, str] | None:
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, key
    return None


def large_mfu(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """The ~1B llama: ours only (transformers' would double the memory), bf16 autocast, fp32 weights
    and AdamW states, as the trainer runs it with precision = "auto" on CUDA."""
    seq, batch = args.large_seq, args.large_batch
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        sides = build_sides(LLAMA_1B, batch, seq, device, torch.float32, _bf16_autocast, Path(tmp),
                            baselines=False)
        model = sides[0].model
        model.activation_checkpointing = args.activation_checkpointing
        run(sides, args.warmup, args.steps)
    t = statistics.median(sides[0].wall)
    tokens = batch * seq
    tok_s = tokens / t
    flops_tok = model.flops_per_token(seq)
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    mfu = f"{tok_s * flops_tok / peak[0]:.1%}" if peak else "- (device not in PEAK_BF16)"
    print(f"\nsft step, llama {model.num_parameters() / 1e9:.2f}B bf16 autocast, B={batch} T={seq} on {name}: "
          f"{t * 1e3:.0f} ms/step, {tok_s:.0f} tokens/s, {flops_tok / 1e9:.2f} GFLOP/token, MFU {mfu}"
          + (f" (peak {peak[0] / 1e12:.0f} TFLOP/s bf16 dense, table entry {peak[1]!r})" if peak else ""))
    what = "sft train step (fwd+bwd+AdamW), ours, bf16 autocast"
    if peak:
        what += f"; MFU {mfu} of {peak[0] / 1e12:.0f} TFLOP/s ({peak[1]} bf16 dense)"
    return [[today(), what,
             f"llama {model.num_parameters() / 1e9:.2f}B, B={batch}, T={seq}, V={LLAMA_1B['vocab_size']}",
             f"wall {t * 1e3:.0f} ms", f"{tok_s:.0f} tok/s", "-", peak_memory(), name, versions(*VERSIONS)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (the first included)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--large-batch", type=int, default=4, help="CUDA only: batch of the ~1B llama")
    parser.add_argument("--large-seq", type=int, default=2048, help="CUDA only: sequence of the ~1B llama")
    parser.add_argument("--activation-checkpointing", action="store_true", help="CUDA only, ~1B llama")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on CPU; 1 keeps CPU time meaningful on a shared machine")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = small_comparison(args, device)
    if device.type == "cuda":
        rows += large_mfu(args, device)
    else:
        print("\n~1B llama MFU run skipped: no CUDA device (it needs a GPU with bf16; run this script on one)")
    if not args.no_append:
        append_rows(rows)
        print(f"\nappended {len(rows)} row(s) to {RESULTS}")


if __name__ == "__main__":
    main()
