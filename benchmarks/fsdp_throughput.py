"""Training throughput of a ~1.1B llama on one GPU: FSDP2 (world size 1) vs the same model without FSDP.

The model has TinyLlama-1.1B's shape (22 layers, hidden 2048, SwiGLU 5632, 32 query / 4 key-value heads,
vocab 32000). A step is one forward/backward of causal_lm_loss (fused LM head) on random tokens plus an
AdamW update, in bf16:

    fsdp    minirlhf.distributed.shard_model: fully_shard per block + root, MixedPrecisionPolicy(bf16
            params, fp32 reduce), fp32 master weights; a one-rank process group (what torchrun gives
            each GPU, minus the communication)
    plain   the baseline, measured in the same run: fp32 weights under bf16 autocast, fused AdamW

Reports tokens/s, MFU = tokens/s * model.flops_per_token(T) / peak bf16 FLOP/s (6N + 12 L H d T, PaLM
appendix B; peak from --peak-tflops, default 989 = H100/H200 SXM dense bf16), peak memory, and the ratio
fsdp / plain. On one GPU FSDP has nothing to shard, so the ratio measures its overhead (the per-block
hooks and casts); the multi-GPU scaling is the same code with more ranks (docs/distributed.md).

    python benchmarks/fsdp_throughput.py [--batch 4] [--seq 2048] [--steps 10] [--checkpointing]
                                          [--peak-tflops 989] [--no-append]
Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from results import RESULTS, ROOT, append_rows, today, versions

sys.path.insert(0, str(ROOT))

CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def build(checkpointing: bool):
    from minirlhf.model import ModelConfig, Transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelConfig(**CONFIG))
    model.activation_checkpointing = checkpointing
    return model


def time_steps(model, optimizer, batch: int, seq: int, steps: int, autocast: bool) -> tuple[float, float]:
    """Seconds per step (median of `steps` after 2 warm-up steps) and peak memory in GB."""
    from minirlhf.logprobs import causal_lm_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), device="cuda", generator=g)
    data = {"input_ids": ids, "labels": ids}
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("fsdp_throughput: skipped, needs a CUDA GPU (FSDP's CPU path is tested in tests/test_distributed.py)")
        return

    import torch.distributed as dist

    from minirlhf.distributed import DistContext, shard_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    torch.cuda.set_device(0)
    tokens = args.batch * args.seq
    rows = {}
    for kind in ("plain", "fsdp"):
        model = build(args.checkpointing)
        flops = model.flops_per_token(args.seq)
        n_params = model.num_parameters()
        if kind == "fsdp":
            ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0), mixed_precision=True)
            shard_model(model, ctx)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        sec, mem = time_steps(model, optimizer, args.batch, args.seq, args.steps, autocast=True)
        rows[kind] = (sec, mem)
        tps = tokens / sec
        print(f"{kind:5s}: {sec * 1e3:.1f} ms/step  {tps:,.0f} tok/s  MFU {tps * flops / (args.peak_tflops * 1e12):.1%}"
              f"  peak {mem:.1f} GB  ({n_params / 1e9:.2f}B params)")
        del model, optimizer
        torch.cuda.empty_cache()
    ratio = rows["plain"][0] / rows["fsdp"][0]
    print(f"fsdp / plain throughput: {ratio:.3f}")
    dist.destroy_process_group()
    if args.no_append or not RESULTS.exists():
        return
    name = torch.cuda.get_device_name(0)
    shape = f"llama {n_params / 1e9:.2f}B, B={args.batch}, T={args.seq}, bf16" + (", AC" if args.checkpointing else "")
    env_versions, date = versions("torch", "python"), today()
    table = []
    for kind, (sec, mem) in rows.items():
        tps = tokens / sec
        mfu = tps * flops / (args.peak_tflops * 1e12)
        what = "train step, FSDP2 one GPU vs plain" if kind == "fsdp" else "train step, plain (baseline)"
        table.append([date, what, shape, f"{sec * 1e3:.1f} ms", f"{tps:,.0f} tok/s, MFU {mfu:.1%}", f"{ratio:.3f}",
                      f"peak {mem:.1f} GB", name, env_versions])
    append_rows(table)


if __name__ == "__main__":
    main()
