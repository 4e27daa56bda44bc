"""The decoding options that chat, generate and eval share, checked once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from minirlhf.commands import CommandError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> "Sampling":
        if self.temperature < 0:
            raise CommandError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CommandError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CommandError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise CommandError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        """The keywords of minirlhf.generation.generate (and sample_next) for these settings."""
        return {"temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p if self.top_p < 1 else None}


def add_sampling_arguments(p: argparse.ArgumentParser, defaults: Sampling, seed: bool = True) -> None:
    p.add_argument("--temperature", type=float, default=defaults.temperature, metavar="T",
                   help=f"sampling temperature; 0 = greedy (default {defaults.temperature:g})")
    p.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P",
                   help=f"nucleus sampling: keep the most likely tokens up to this probability mass "
                        f"(default {defaults.top_p:g}; 1 = off)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                   help=f"keep only the k most likely tokens (default {defaults.top_k}; 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N",
                   help=f"longest answer, in tokens (default {defaults.max_new_tokens})")
    if seed:
        p.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                       help=f"random seed of the sampling (default {defaults.seed})")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=getattr(args, "seed", 0)).check()
