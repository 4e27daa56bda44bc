"""Generation speed on a real checkpoint: our `Transformer.generate` against transformers' `generate`.

Both load the same directory (SmolLM2-135M-Instruct by default; `make bench` builds it) in the same
dtype and continue the same chat prompts, left padded to a common length, by the same number of new
tokens. Neither stops at eos (ours: eos_token_id=[]; transformers: no eos in its generation configs), so
every row runs to max_new_tokens on both sides. Greedy: the tokens are compared (identical, or the
share that agrees). Sampled: temperature 1, top-k 50, top-p 0.9 on both sides.

transformers runs with its plain best settings: sdpa attention, use_cache, its default cache
(dynamic); `--hf-cache static dynamic` adds its static cache and the faster of the two is the baseline,
named in each row. Ours runs with its defaults ("fused": fused, LoRA-folded, oneDNN-prepacked weights
built once per call where that pays, the build included in the time); `--ours modules fused compile`
adds the modules' own weights and the compiled step (its compile time, the first call's extra wall
time, is printed and recorded).

Timing: one warm-up call per side, then `--repeats` rounds alternating the sides, medians. With one
torch thread (the default) the clock is the process's CPU time, which the other jobs on a shared
machine barely move; with more threads it is wall time.

    python benchmarks/generate.py [--batches 1 8 32] [--dtypes float32 bfloat16] [--modes greedy sampled]
                                  [--new-tokens 64] [--repeats 3] [--threads 1] [--section generate|matmuls]

`--section matmuls` times only what bounds a decode step: the step itself against the sum of its
matmuls (modules' weights, fused, fused and prepacked) and its attention calls, ours alone.
Appends one row per dtype, batch, mode and our variant to benchmarks/RESULTS.md (--no-append: don't).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from results import REAL_MODEL, RESULTS, ROOT, append_rows, cpu_device, require_model, today, versions

sys.path.insert(0, str(ROOT))
from minirlhf.generation import step_mask  # noqa: E402
from minirlhf.inference_weights import inference_weights  # noqa: E402
from minirlhf.model import Transformer  # noqa: E402
from minirlhf.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short tip for learning to play the guitar, and say why it helps beginners most.",
    "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Name a famous painting by Vermeer.",
    "Why do cats purr? Answer briefly.",
    "Suggest a name for a small bakery that sells bread and coffee in a quiet seaside town.",
]
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}


def make_prompts(tokenizer, batch: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts cycling through PROMPTS, left padded: ids, attention_mask [B, P]."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                          add_generation_prompt=True).ids for i in range(batch)]
    P = max(map(len, rows))
    ids = torch.full((batch, P), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, P, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    return ids, mask


def ours_fn(model: Transformer, ids, mask, new: int, mode: str, variant: str, pad_id: int) -> Callable:
    kw = {"temperature": 0.0} if mode == "greedy" else dict(SAMPLING)
    gen = torch.Generator().manual_seed(0)

    def run() -> torch.Tensor:
        return model.generate(ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=pad_id, generator=gen,
                              fused_weights=False if variant == "modules" else None, compile=variant == "compile",
                              **kw).tokens
    return run


def hf_fn(model, ids, mask, new: int, mode: str, cache: str, pad_id: int) -> Callable:
    kw = {"do_sample": False} if mode == "greedy" else {"do_sample": True, **SAMPLING}
    config = transformers.GenerationConfig(max_new_tokens=new, pad_token_id=pad_id, eos_token_id=None,
                                           use_cache=True, cache_implementation=None if cache == "dynamic" else cache,
                                           **kw)

    def run() -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    return run


def clock(threads: int) -> str:
    return "cpu" if threads == 1 else "wall"


def timed(fn: Callable) -> dict[str, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}


def compare(sides: dict[str, Callable], repeats: int) -> tuple[dict[str, dict[str, float]], dict, dict]:
    """Warm-up call of each side (its result and wall time kept), then `repeats` rounds alternating the
    sides; returns medians {side: {"cpu": s, "wall": s}}, the warm-up results and warm-up times."""
    first, warm = {}, {}
    for name, fn in sides.items():
        c0, w0 = time.process_time(), time.perf_counter()
        first[name] = fn()
        warm[name] = {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timed(fn))
    med = {name: {k: statistics.median(t[k] for t in ts) for k in ("cpu", "wall")} for name, ts in times.items()}
    return med, first, warm


def device_name(threads: int) -> str:
    return cpu_device(threads)


def generate_section(args, tokenizer, pad_id: int) -> list[list[str]]:
    rows = []
    env = versions("torch", "transformers")
    c = clock(args.threads)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours = Transformer.from_pretrained(args.model, dtype=dtype).eval()
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype,
                                                               attn_implementation="sdpa").eval()
        hf.generation_config.eos_token_id = None  # else it fills the None of our config with the model's eos
        for B in args.batches:
            ids, mask = make_prompts(tokenizer, B, pad_id)
            for mode in args.modes:
                sides = {f"ours/{v}": ours_fn(ours, ids, mask, args.new_tokens, mode, v, pad_id) for v in args.ours}
                sides.update({f"hf/{h}": hf_fn(hf, ids, mask, args.new_tokens, mode, h, pad_id) for h in args.hf_cache})
                if "compile" in args.ours:  # each row compiles afresh: its own static step, its own compile time
                    torch._dynamo.reset()
                with torch.no_grad():
                    med, first, warm = compare(sides, args.repeats)
                base = min((n for n in sides if n.startswith("hf/")), key=lambda n: med[n][c])
                n_tok = B * args.new_tokens
                print(f"\n{dtype_name}, batch {B}, {mode}, prompt {ids.shape[1]} (left padded), "
                      f"{args.new_tokens} new tokens; ms per step ({c}; wall in brackets)")
                for name in sides:
                    t = med[name]
                    per_step, wall = t[c] / args.new_tokens * 1e3, t["wall"] / args.new_tokens * 1e3
                    print(f"  {name:14s} {per_step:8.1f} ms ({wall:.1f})   {n_tok / t[c]:8.1f} tok/s   "
                          f"x{med[base][c] / t[c]:.2f} vs {base}")
                for name in sides:
                    if not name.startswith("ours/"):
                        continue
                    if mode == "greedy":
                        reference = first["hf/dynamic" if "hf/dynamic" in first else base]
                        agree = (first[name] == reference).float().mean().item()
                        tokens = "identical" if agree == 1.0 else f"{agree:.1%} agree"
                    else:
                        tokens = "sampled"
                    note = ""
                    if name == "ours/compile":
                        compile_s = warm[name]["wall"] - med[name]["wall"]
                        note = f"; compile {compile_s:.0f} s (first call minus a warm one)"
                        print(f"  {name}: compile time {compile_s:.1f} s wall")
                    print(f"  {name} tokens vs transformers: {tokens}")
                    ratio = med[base][c] / med[name][c]
                    rows.append([
                        today(),
                        f"generate {mode}, ours ({name[5:]}) vs transformers ({base[3:]} cache); tokens {tokens}{note}",
                        f"SmolLM2-135M {dtype_name}, B={B}, prompt {ids.shape[1]} left padded, new {args.new_tokens}",
                        (f"{c} {med[name][c] / args.new_tokens * 1e3:.1f} vs "
                         f"{med[base][c] / args.new_tokens * 1e3:.1f} "
                         f"ms/step (wall {med[name]['wall'] / args.new_tokens * 1e3:.1f} vs "
                         f"{med[base]['wall'] / args.new_tokens * 1e3:.1f})"),
                        f"{n_tok / med[name][c]:.1f} vs {n_tok / med[base][c]:.1f} tok/s",
                        f"{ratio:.2f}x", "-", device_name(args.threads), env,
                    ])
        del ours, hf
    return rows


def median_ms(fn: Callable, n: int = 7) -> float:
    fn()
    return statistics.median(timed(fn)["cpu"] for _ in range(n)) * 1e3


def matmuls_section(args) -> list[list[str]]:
    """Where a decode step's time goes: the whole step against its matmuls and its attention calls."""
    print("\nOne decode step (cache of 96 slots, 40 filled, the step attending those and its own), ours; "
          "ms of process CPU time, median of 7")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model = Transformer.from_pretrained(args.model, dtype=dtype).eval()
        C, I = model.config.hidden_size, model.config.intermediate_size
        for B in args.batches:
            S, filled = 96, 40
            model.setup_kv_cache(B, S)
            ids, pos, slot = torch.zeros(B, 1, dtype=torch.long), torch.full((B, 1), filled), torch.tensor([filled])
            mask = step_mask(torch.ones(B, filled, dtype=torch.bool), S, dtype)[..., : filled + 1]
            mask[..., filled] = 0.0  # the step's own slot, as generate opens it
            x, xi = torch.randn(B, 1, C, dtype=dtype), torch.randn(B, 1, I, dtype=dtype)
            H, d = model.config.num_attention_heads, model.config.head_dim
            q = torch.randn(B, H, 1, d, dtype=dtype)

            def module_mats():
                for layer in model.layers:
                    a, m = layer.self_attn, layer.mlp
                    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj):
                        lin(x)
                    m.down_proj(xi)
                model.lm_head(x[:, -1])

            def attention():
                for layer in model.layers:
                    cache = layer.self_attn.kv_cache
                    k, v = cache.k[:, :, : filled + 1], cache.v[:, :, : filled + 1]
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            with torch.no_grad():
                plain = median_ms(lambda: model.lm_head(model.decode_step(ids, pos, slot, mask)[:, -1]))
                mods = median_ms(module_mats)
                att = median_ms(attention)
                with inference_weights(model, B) as head:
                    def fused_mats():
                        for layer in model.layers:
                            a, m = layer.self_attn, layer.mlp
                            a.frozen_qkv(x), a.frozen_o(x), m.frozen_in(x), m.frozen_down(xi)
                        head(x[:, -1])
                    fused = median_ms(lambda: head(model.decode_step(ids, pos, slot, mask)[:, -1]))
                    fmats = median_ms(fused_mats)
                    packed = head.packed
            model.clear_kv_cache()
            kind = "fused+packed" if packed else "fused"
            print(f"  {dtype_name} batch {B:2d}: step {plain:6.1f} (modules) {fused:6.1f} ({kind})"
                  f" | matmuls {mods:6.1f} (modules) {fmats:6.1f} ({kind})"
                  f" | attention {att:5.1f} | rest of the fused step {fused - fmats - att:5.1f}")
            rows.append([today(), "one decode step, ours: step vs its matmuls vs its attention (where the time goes)",
                         f"SmolLM2-135M {dtype_name}, B={B}, cache 96 slots",
                         f"cpu step {fused:.1f} ms fused ({plain:.1f} modules); matmuls {fmats:.1f} ({mods:.1f}); "
                         f"attention {att:.1f}", "-", "-", "-", device_name(args.threads), versions("torch")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REAL_MODEL)
    parser.add_argument("--section", choices=["generate", "matmuls", "all"], default="generate")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument("--ours", nargs="+", default=["fused"], choices=["fused", "modules", "compile"])
    parser.add_argument("--hf-cache", nargs="+", default=["dynamic"], choices=["dynamic", "static"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; with 1 the clock is process CPU time (robust on a shared machine)")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    require_model(args.model)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(args.model))
    config = Transformer.from_pretrained(args.model).config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    print(f"{versions('torch', 'transformers')}; {device_name(args.threads)}; model {args.model}")
    rows = []
    if args.section in ("generate", "all"):
        rows += generate_section(args, tokenizer, pad_id)
    if args.section in ("matmuls", "all"):
        rows += matmuls_section(args)
    if not args.no_append:
        append_rows(rows)
        print(f"\nappended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
