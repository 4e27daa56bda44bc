"""Greedy decoding speed: our `Transformer.generate` against transformers' `generate`, same weights.

Random llamas of two sizes are built with transformers, saved, and loaded by
`Transformer.from_pretrained`, so both decoders hold the same float32 weights. Both continue the same
prompts (batch 1, and batch 8 left padded to different lengths) greedily by a fixed number of new
tokens; one warm-up run each, then the median of a few timed repeats, alternating ours and theirs.
The eos token's row of the LM head is zeroed: given the final hidden state h, the other logits h . w_i
are iid normal around 0, so the eos logit (exactly 0) is the argmax with probability 2^-(V-1); every
row runs to max_new_tokens in both decoders, and we check that and that the tokens are identical.

Speed is tokens / process CPU time with one torch thread: this machine's 2 cores are shared with other
jobs, and the wall time (printed too) swings by 2-3x with their load, while single-thread CPU time
moves by a few percent.

    python benchmarks/generate.py [--sizes tiny small] [--batches 1 8] [--new-tokens 64] [--profile]

Prints tokens/s for both and the ratio ours / theirs, and appends one row per size and batch to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from results import RESULTS, ROOT, append_rows, cpu_name, today, versions

sys.path.insert(0, str(ROOT))
from minirlhf.model import Transformer

# "tiny": per-step matmuls are cheap, so the time is the decode loop's own overhead (Python, small
# ops); "small": GQA, untied head, matmuls dominate and both sides share the same floor.
SIZES = {
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4},
}
BOS, EOS, PAD = 1, 2, 0


def device_name() -> str:
    return f"CPU {cpu_name()}, {torch.get_num_threads()} threads"


def build_model(directory: Path, size: dict, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers llama, saved to directory; its eos logit is always 0 (see the top)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**size, max_position_embeddings=512, bos_token_id=BOS,
                                      eos_token_id=EOS, pad_token_id=PAD)
    hf = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():  # HF starts norms at 1; make them random too
            p.add_(torch.randn_like(p) * 0.02)
        hf.lm_head.weight[EOS] = 0.0
    hf.save_pretrained(directory)
    return hf


def make_prompts(batch: int, max_len: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [B, max_len]; row i has max_len - 3*i real tokens (batch 1: no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, max_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = min(3 * i, max_len - 1)
        ids[i, :pad] = PAD
        mask[i, :pad] = 0
    return ids, mask


def run_ours(model: Transformer, ids, mask, new_tokens: int) -> torch.Tensor:
    out = model.generate(ids, mask, max_new_tokens=new_tokens, temperature=0.0,
                         eos_token_id=EOS, pad_token_id=PAD)
    return out.tokens


def run_theirs(hf, ids, mask, new_tokens: int) -> torch.Tensor:
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=EOS, pad_token_id=PAD,
                      temperature=None, top_p=None, top_k=None)
    return out[:, ids.shape[1]:]


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Median times of fn_a and fn_b over `repeats` alternating calls, after one warm-up call of each,
    and the warm-up results. Each time is a dict {"cpu": s, "wall": s}: the process's CPU time is what
    the ratio uses, since on a shared machine the wall time mostly measures the other processes;
    alternating the two keeps load swings from favouring one side."""
    with torch.inference_mode():
        result_a, result_b = fn_a(), fn_b()
        times: dict[int, dict[str, list[float]]] = {0: {"cpu": [], "wall": []}, 1: {"cpu": [], "wall": []}}
        for _ in range(repeats):
            for i, fn in enumerate((fn_a, fn_b)):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                times[i]["cpu"].append(time.process_time() - c0)
                times[i]["wall"].append(time.perf_counter() - w0)
    med = [{k: statistics.median(v) for k, v in times[i].items()} for i in (0, 1)]
    return med[0], med[1], result_a, result_b


def profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- torch.profiler, {label} (top ops by self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads; 1 keeps CPU time meaningful on a shared machine")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for each")
    parser.add_argument("--no-append", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    env_versions = versions("torch", "transformers")
    print(f"{env_versions}; {device_name()}; float32, greedy, {args.new_tokens} new tokens, prompt "
          f"{args.prompt_len} (rows left padded by 3*i), median of {args.repeats} after a warm-up; "
          "tok/s from process CPU time (wall time in brackets)")
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf = build_model(Path(tmp), SIZES[size])
            ours = Transformer.from_pretrained(tmp).eval()
        n_params = sum(p.numel() for p in ours.parameters())
        print(f"\n{size} llama: {n_params / 1e6:.2f}M params ({SIZES[size]['num_hidden_layers']} layers, "
              f"hidden {SIZES[size]['hidden_size']}, vocab {SIZES[size]['vocab_size']})")
        for B in args.batches:
            ids, mask = make_prompts(B, args.prompt_len, SIZES[size]["vocab_size"])
            def ours_fn(ids=ids, mask=mask, model=ours):
                return run_ours(model, ids, mask, args.new_tokens)

            def theirs_fn(ids=ids, mask=mask, model=hf):
                return run_theirs(model, ids, mask, args.new_tokens)

            t_ours, t_hf, tok_ours, tok_hf = timed_pair(ours_fn, theirs_fn, args.repeats)
            n = B * args.new_tokens
            assert tok_ours.shape == tok_hf.shape == (B, args.new_tokens), (tok_ours.shape, tok_hf.shape)
            assert not bool((tok_ours == EOS).any()), "eos won an argmax: rows stopped early"
            same = bool(torch.equal(tok_ours, tok_hf))
            agree = (tok_ours == tok_hf).float().mean().item()
            ratio = t_hf["cpu"] / t_ours["cpu"]
            print(f"  batch {B}: ours {n / t_ours['cpu']:7.0f} tok/s ({t_ours['wall'] * 1e3:6.0f} ms wall)   "
                  f"transformers {n / t_hf['cpu']:7.0f} tok/s ({t_hf['wall'] * 1e3:6.0f} ms wall)   "
                  f"ratio {ratio:.2f}x   tokens identical: {same}" + ("" if same else f" ({agree:.1%} agree)"))
            if args.profile:
                profile(ours_fn, f"ours, {size}, batch {B}")
                profile(theirs_fn, f"transformers, {size}, batch {B}")
            rows.append([
                today(),
                ("generate greedy, ours vs transformers `generate`; tokens "
                 + ("identical" if same else f"DIFFER ({agree:.1%} agree)")),
                f"{size} llama {n_params / 1e6:.2f}M fp32, B={B}, prompt {args.prompt_len}, new {args.new_tokens}",
                (f"cpu {t_ours['cpu'] * 1e3:.0f} vs {t_hf['cpu'] * 1e3:.0f} ms "
                 f"(wall {t_ours['wall'] * 1e3:.0f} vs {t_hf['wall'] * 1e3:.0f})"),
                f"{n / t_ours['cpu']:.0f} vs {n / t_hf['cpu']:.0f} tok/s",
                f"{ratio:.2f}x",
                "-",
                device_name(),
                env_versions,
            ])
    if not args.no_append:
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
