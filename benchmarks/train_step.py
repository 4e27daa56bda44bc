"""Training steps on a real checkpoint, ours against the libraries users would pick instead.

Tasks (each one optimizer step: forward, backward, AdamW), sequence length 512 by default:

    sft    full fine-tuning                      vs transformers (model(input_ids, labels).loss)
    lora   sft with LoRA r=16 on every linear    vs transformers + peft
    dpo    full policy + frozen reference        vs TRL's DPOTrainer (its training_step + optimizer)
    ppo    the clipped policy loss on answers    vs transformers logits + TRL's selective_log_softmax

Sides are `who:precision[+ckpt][+compile]`: ours or hf, fp32 or bf16 (CPU autocast), +ckpt for activation
checkpointing (ours: Transformer.activation_checkpointing; hf: gradient_checkpointing_enable), +compile
for ours with [train] compile (Transformer.compile_blocks; the warm-up step's extra time is reported).
Both sides step torch's fused AdamW (transformers' Trainer default; our trainer's on CUDA).
Ours computes its losses through the chunked LM head (minirlhf/kernels: never the [B, T, V] logits).

Every side runs in a fresh process (benchmarks/step_worker.py: one warm-up step, then `--steps` timed
ones), so its peak RSS (getrusage ru_maxrss) is its own; the processes of all sides alternate, round
after round (`--repeats`), so that a change in the machine's load hits every side alike; the time is
the median over all timed steps of a side, in process CPU time with one torch thread (the default; wall
time with more), the memory the median of its processes' peak RSS.

    python benchmarks/train_step.py [--tasks sft lora dpo ppo] [--sides ours:bf16+ckpt hf:fp32 ...]
                                    [--batch 4] [--seq 512] [--steps 2] [--repeats 2] [--section ...]

--section steps (the default) runs the tasks above; --section chunks times the LM-head loss alone
(chunked against the plain full logits); --section mfu is the CUDA one (a ~1B llama, bf16 autocast,
MFU; prints a note and exits without CUDA). Appends rows to benchmarks/RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results import REAL_MODEL, RESULTS, ROOT, append_rows, cpu_device, require_model, run_json, today, versions

sys.path.insert(0, str(ROOT))
from minirlhf.kernels.fused_cross_entropy import linear_cross_entropy_chunked  # noqa: E402

WORKER = Path(__file__).resolve().parent / "step_worker.py"
VERSIONS = ("torch", "transformers", "peft", "trl", "python")  # the RESULTS.md versions column
BASELINE = {"sft": "transformers", "lora": "transformers + peft", "dpo": "TRL DPOTrainer",
            "ppo": "transformers + TRL selective_log_softmax"}
DEFAULT_SIDES = ["ours:bf16+ckpt+compile", "ours:bf16+ckpt", "hf:fp32", "hf:bf16"]
# batch per task at the default seq 512: dpo's batch is pairs (2B sequences through policy and reference)
BATCH = {"sft": 4, "lora": 4, "dpo": 2, "ppo": 4}
# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendor data sheets (SXM parts);
# matched as substrings of torch.cuda.get_device_name(), first match wins
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def device_name(threads: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_device(threads)


def run_worker(task: str, side: str, args) -> dict:
    batch = args.batch or BATCH[task]
    cmd = [sys.executable, str(WORKER), task, side, "--model", str(args.model), "--batch", str(batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    return run_json(cmd)


def steps_section(args) -> list[list[str]]:
    clock = "cpu" if args.threads == 1 else "wall"
    rows = []
    for task in args.tasks:
        runs: dict[str, list[dict]] = {side: [] for side in args.sides}
        for _ in range(args.repeats):
            for side in args.sides:
                runs[side].append(run_worker(task, side, args))
        batch = args.batch or BATCH[task]
        shape = (f"SmolLM2-135M, {'B=' + str(batch) + ' pairs' if task == 'dpo' else 'B=' + str(batch)}, "
                 f"T={args.seq}")
        print(f"\n{task}: {shape}; median over {args.repeats} processes x {args.steps} steps; {clock} time; "
              f"peak RSS of the process")
        summary, compiling = {}, {}
        for side, rs in runs.items():
            t = statistics.median(x for r in rs for x in r[clock])
            mem = statistics.median(r["peak_rss"] for r in rs)
            summary[side] = (t, mem, rs[0]["first_loss"])
            compiling[side] = statistics.median(r["warmup_wall"] for r in rs) - statistics.median(
                x for r in rs for x in r["wall"])
            print(f"  {side:22s} {t:7.2f} s/step   peak RSS {mem:5.2f} GiB   first loss {rs[0]['first_loss']:.5f}"
                  f"   warm-up step +{compiling[side]:.1f} s")
        for ours in (s for s in args.sides if s.startswith("ours")):
            for theirs in (s for s in args.sides if s.startswith("hf")):
                (t_o, m_o, l_o), (t_h, m_h, l_h) = summary[ours], summary[theirs]
                speed, memory = t_h / t_o, m_o / m_h
                print(f"  {ours} vs {theirs}: {speed:.2f}x faster, {memory:.2f}x the peak memory")
                compiled = (f"; compile: first step +{compiling[ours]:.0f} s wall, once" if "compile" in ours
                            else "")
                rows.append([today(), f"{task} step, ours ({ours[5:]}) vs {BASELINE[task]} ({theirs[3:]}); "
                             f"first losses {l_o:.4f} vs {l_h:.4f}{compiled}", shape,
                             f"{clock} {t_o:.2f} vs {t_h:.2f} s/step", "-", f"{speed:.2f}x",
                             f"peak RSS {m_o:.2f} vs {m_h:.2f} GiB = {memory:.2f}x", device_name(args.threads),
                             versions(*VERSIONS)])
    return rows


def chunks_section(args) -> list[list[str]]:
    """The LM-head loss alone at the real model's shape: chunked (ours) against full logits +
    F.cross_entropy, forward and backward, fp32 and bf16, interleaved."""
    config = json.loads((Path(args.model) / "config.json").read_text())
    H, V, N = config["hidden_size"], config["vocab_size"], (args.batch or 4) * args.seq
    rows = []
    print(f"\nLM-head cross-entropy, N={N} tokens, H={H}, V={V}: forward + backward, process CPU time")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
        weight = (0.05 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
        labels = torch.randint(0, V, (N,), generator=g)

        def plain():
            F.cross_entropy((hidden @ weight.T).float(), labels).backward()

        def chunked():
            linear_cross_entropy_chunked(hidden, weight, labels).backward()

        times = {"chunked": [], "plain": []}
        for _ in range(args.repeats + 1):
            for name, fn in (("chunked", chunked), ("plain", plain)):
                c0 = time.process_time()
                fn()
                times[name].append(time.process_time() - c0)
        t_c, t_p = (statistics.median(times[k][1:]) for k in ("chunked", "plain"))
        plain_bytes = N * V * (dtype.itemsize + 4 + 4)  # logits, their fp32 copy / log-softmax, the gradient
        print(f"  {str(dtype)[6:]:9s} chunked {t_c * 1e3:7.0f} ms   plain {t_p * 1e3:7.0f} ms   "
              f"x{t_p / t_c:.2f}; the plain path holds ~{plain_bytes / 2**30:.2f} GiB of logits")
        rows.append([today(), "LM-head cross-entropy fwd+bwd, chunked (ours, torch path) vs full logits + "
                     "F.cross_entropy", f"N={N}, H={H}, V={V}, {str(dtype)[6:]}",
                     f"cpu {t_c * 1e3:.0f} vs {t_p * 1e3:.0f} ms", "-", f"{t_p / t_c:.2f}x",
                     f"plain holds ~{plain_bytes / 2**30:.2f} GiB of logits", device_name(args.threads),
                     versions("torch")])
    return rows


def mfu_section(args) -> list[list[str]]:
    """A ~1B llama (TinyLlama's shape) on one GPU: ours, bf16 autocast, fp32 weights and fused AdamW, as
    the trainer runs it with precision = "auto" on CUDA; MFU = tokens/s * flops_per_token / peak bf16
    FLOP/s. The model and the timed loop are fsdp_throughput.py's."""
    if not torch.cuda.is_available():
        print("\n~1B llama MFU run skipped: no CUDA device (it needs a GPU with bf16; run this script on one)")
        return []
    from fsdp_throughput import CONFIG, build, time_steps

    seq, batch = args.large_seq, args.large_batch
    model = build(args.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    t, peak_gb = time_steps(model, opt, batch, seq, args.steps, autocast=True)
    tok_s = batch * seq / t
    flops = model.flops_per_token(seq)
    name = torch.cuda.get_device_name()
    peak = next(((f, k) for k, f in PEAK_BF16 if k in name), None)
    mfu = f"{tok_s * flops / peak[0]:.1%}" if peak else "- (device not in PEAK_BF16)"
    mem = f"peak {peak_gb:.1f} GB"
    print(f"\nsft step, llama {model.num_parameters() / 1e9:.2f}B bf16 autocast, B={batch} T={seq} on {name}: "
          f"{t * 1e3:.0f} ms/step, {tok_s:.0f} tokens/s, MFU {mfu}, {mem}")
    what = "sft train step (fwd+bwd+AdamW), ours, bf16 autocast" + (f"; MFU {mfu} of {peak[0] / 1e12:.0f} TFLOP/s "
                                                                    f"({peak[1]} bf16 dense)" if peak else "")
    return [[today(), what, f"llama {model.num_parameters() / 1e9:.2f}B, B={batch}, T={seq}, V={CONFIG['vocab_size']}",
             f"wall {t * 1e3:.0f} ms", f"{tok_s:.0f} tok/s", "-", mem, name, versions(*VERSIONS)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["steps", "chunks", "mfu", "all"], default="steps")
    parser.add_argument("--model", type=Path, default=REAL_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["sft", "lora", "dpo", "ppo"],
                        choices=["sft", "lora", "dpo", "ppo"])
    parser.add_argument("--sides", nargs="+", default=DEFAULT_SIDES)
    parser.add_argument("--batch", type=int, default=None, help=f"default per task: {BATCH}")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; with 1 the clock is process CPU time (robust on a shared machine)")
    parser.add_argument("--large-batch", type=int, default=4, help="mfu: batch of the ~1B llama")
    parser.add_argument("--large-seq", type=int, default=2048, help="mfu: sequence of the ~1B llama")
    parser.add_argument("--activation-checkpointing", action="store_true", help="mfu: on the ~1B llama")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{versions(*VERSIONS)}; {device_name(args.threads)}")
    rows = []
    if args.section in ("steps", "chunks", "all") and not torch.cuda.is_available():
        require_model(args.model)
    if args.section in ("steps", "all"):
        rows += steps_section(args)
    if args.section in ("chunks", "all"):
        rows += chunks_section(args)
    if args.section in ("mfu", "all"):
        rows += mfu_section(args)
    if rows and not args.no_append:
        append_rows(rows)
        print(f"\nappended {len(rows)} row(s) to {RESULTS}")


if __name__ == "__main__":
    main()
