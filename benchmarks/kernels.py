"""Triton kernels against their PyTorch baselines on one CUDA GPU, all in one run.

1. Causal attention, bf16: our FlashAttention-2 kernel vs `scaled_dot_product_attention` restricted
   to its flash backend (`torch.nn.attention.sdpa_kernel`), forward and forward+backward, for
   T in {1k, 2k, 4k, 8k, 16k} and head dims 64 and 128, B*T = 16k tokens and H*D = 2048.
   FLOPs as in Triton's fused-attention tutorial: 4*B*H*T^2*D for the two matmuls, x0.5 causal,
   x2.5 for the backward (so x3.5 for forward+backward).
2. Fused linear + cross-entropy vs naive `F.cross_entropy((h @ W.T).float(), y)`, forward+backward,
   bf16, hidden 4096, V in {32k, 128k}, N in {4k, 16k} tokens: time and peak memory above the inputs.

Timing is triton.testing.do_bench (median of repeated runs, L2 flushed). Prints each ratio (ours
better when > 1) and appends one row per measurement to benchmarks/RESULTS.md. Aims: attention
>= 1.0x SDPA forward+backward at T >= 4k; cross-entropy peak memory <= 1/4 naive, time <= 1.1x naive.

    python benchmarks/kernels.py [--quick]

Without CUDA it prints why and exits 0 (the kernels' correctness tests run on the CPU interpreter).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from results import RESULTS, ROOT, append_rows, today, versions

sys.path.insert(0, str(ROOT))

GIB = 1024**3


def environment() -> tuple[str, str, str]:
    """(date, device, versions) columns for this GPU run."""
    device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return today(), device, versions("python", "torch", "triton")


def time_attention(B: int, H: int, T: int, D: int) -> dict[str, tuple[float, float]]:
    """{mode: (ours ms, SDPA flash ms)} for one bf16 causal shape, after checking the outputs agree."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from minirlhf.kernels.flash_attention import attention_triton

    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours():
        return attention_triton(q, k, v)

    ref_out, our_out = sdpa().float(), ours().float()
    err = ((our_out - ref_out).abs().max() / ref_out.abs().max()).item()
    if err > 2e-2:
        raise RuntimeError(f"attention B={B} H={H} T={T} D={D}: relative error {err:.1e} against SDPA")
    return {
        "fwd": (do_bench(ours), do_bench(sdpa)),
        "fwd+bwd": (do_bench(lambda: ours().backward(grad)), do_bench(lambda: sdpa().backward(grad))),
    }


def bench_attention(seq_lens: list[int], head_dims: list[int], tokens: int, width: int) -> list[list[str]]:
    date, device, env_versions = environment()
    rows = []
    print(f"\nattention, bf16, causal, B*T = {tokens}, H*D = {width} (TFLOP/s; ratio = ours / SDPA flash)")
    print(f"{'T':>6} {'D':>4} {'mode':>8} {'ours':>8} {'sdpa':>8} {'ratio':>6}")
    for D in head_dims:
        for T in seq_lens:
            B, H = max(1, tokens // T), width // D
            flops_fwd = 4 * B * H * T * T * D * 0.5  # causal: half the score matrix
            for mode, (ms_ours, ms_ref) in time_attention(B, H, T, D).items():
                flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)  # backward = 2.5x forward
                tf_ours, tf_ref = flops / ms_ours * 1e-9, flops / ms_ref * 1e-9
                ratio = tf_ours / tf_ref
                print(f"{T:>6} {D:>4} {mode:>8} {tf_ours:8.1f} {tf_ref:8.1f} {ratio:6.2f}")
                rows.append([
                    date, f"attention {mode}: minirlhf Triton vs SDPA flash (bf16, causal)",
                    f"B={B} H={H} T={T} D={D}", f"{ms_ours:.3f} ms (sdpa {ms_ref:.3f} ms)",
                    f"{tf_ours:.1f} TFLOP/s (sdpa {tf_ref:.1f})", f"{ratio:.2f}", "-", device, env_versions,
                ])
            torch.cuda.empty_cache()
    return rows


def time_and_peak(fn) -> tuple[float, int]:
    """(median ms, peak bytes allocated above what was allocated before) of fn()."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return do_bench(fn), peak


def time_cross_entropy(N: int, V: int, hidden: int) -> dict[str, tuple[float, int]]:
    """{"fused"|"naive": (ms, peak bytes)} of forward+backward, after checking the gradients agree.
    Gradients are cleared before each call, so the peak includes writing them (both sides alike)."""
    from minirlhf.kernels.fused_cross_entropy import linear_cross_entropy_triton

    h = torch.randn(N, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(V, hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    y[::7] = -100

    def fused():
        h.grad = w.grad = None
        linear_cross_entropy_triton(h, w, y).backward()

    def naive():
        h.grad = w.grad = None
        F.cross_entropy((h @ w.T).float(), y).backward()

    fused()
    fused_grads = (h.grad.float(), w.grad.float())
    naive()
    err = max(((a - b.float()).abs().max() / b.float().abs().max()).item()
              for a, b in zip(fused_grads, (h.grad, w.grad)))
    if err > 5e-2:
        raise RuntimeError(f"cross-entropy N={N} V={V}: gradient relative error {err:.1e} against naive")
    del fused_grads
    h.grad = w.grad = None
    return {"fused": time_and_peak(fused), "naive": time_and_peak(naive)}


def bench_cross_entropy(vocab_sizes: list[int], token_counts: list[int], hidden: int) -> list[list[str]]:
    date, device, env_versions = environment()
    rows = []
    print(f"\nlinear + cross-entropy fwd+bwd, bf16, hidden {hidden} (time ratio = naive / ours; "
          "memory = peak above the inputs)")
    print(f"{'N':>6} {'V':>7} {'ours ms':>8} {'naive ms':>9} {'ratio':>6} {'ours GiB':>9} {'naive GiB':>10}")
    for V in vocab_sizes:
        for N in token_counts:
            result = time_cross_entropy(N, V, hidden)
            (ms_fused, mem_fused), (ms_naive, mem_naive) = result["fused"], result["naive"]
            ratio = ms_naive / ms_fused
            print(f"{N:>6} {V:>7} {ms_fused:8.2f} {ms_naive:9.2f} {ratio:6.2f} {mem_fused / GIB:9.2f} "
                  f"{mem_naive / GIB:10.2f}")
            rows.append([
                date, "linear+cross-entropy fwd+bwd: minirlhf fused vs naive logits + F.cross_entropy (bf16)",
                f"N={N} H={hidden} V={V}", f"{ms_fused:.2f} ms (naive {ms_naive:.2f} ms)", "-", f"{ratio:.2f}",
                f"{mem_fused / GIB:.2f} GiB (naive {mem_naive / GIB:.2f} GiB, "
                f"{mem_naive / max(mem_fused, 1):.1f}x less)",
                device, env_versions,
            ])
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {1k, 4k}, one CE shape (a smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device, skipping the kernel benchmarks (they time Triton "
              "kernels on a GPU; the CPU interpreter checks correctness: make test-kernels)")
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed, skipping (pip install 'minirlhf[triton]')")
        return
    seq_lens = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    rows = bench_attention(seq_lens, [64, 128], tokens=16384, width=2048)
    rows += bench_cross_entropy([32768] if args.quick else [32768, 131072],
                                [4096] if args.quick else [4096, 16384], hidden=4096)
    append_rows(rows)
    print(f"\nappended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
