"""What several stages share: the base of the stages that train a policy, saving a policy, and the frozen
reference policy (DPO, KTO and PPO measure the policy against it).

The reference pi_ref (`build_reference`), for a stage whose [section] has a `ref_model`:
  - ref_model set: that model, frozen (it goes through build.prepare_backbone like every model a stage
    builds, and must have the policy's vocabulary);
  - else with LoRA: the policy itself with its adapters disabled (no second copy of the weights);
  - else: a frozen copy of the starting model.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.build import DTYPES, load_model, prepare_backbone
from minirlhf.config import Config
from minirlhf.distributed import frozen_forwards
from minirlhf.errors import TrainingError
from minirlhf.lora import base_state_dict, disable_adapters, has_lora
from minirlhf.model import Transformer
from minirlhf.tokenizer import Tokenizer
from minirlhf.toml_fields import ConfigError
from minirlhf.trainer import Stage, Trainer


def save_policy(model: Transformer, tok: Tokenizer, out_dir: Path, base: str = "") -> None:
    """A full HF-format model, or the LoRA adapter in PEFT's layout (naming `base`, the directory the
    run started from, as its base model so that loaders find it), plus the tokenizer files."""
    from minirlhf.peft import save_adapter

    if has_lora(model):
        save_adapter(model, out_dir, base_model_name_or_path=base or None)
    else:
        model.save_pretrained(out_dir)
    tok.save_pretrained(str(out_dir))


class PolicyStage(Stage):
    """A stage that trains a policy (pt, sft, dpo, kto): `model` and `tok`, saved by `save_policy`."""

    model: Transformer
    tok: Tokenizer

    def save_final(self, out_dir: Path, model: nn.Module) -> None:
        save_policy(model, self.tok, out_dir, self.cfg.model.path)


class Reference:
    """The reference policy pi_ref: a frozen model, or the policy with its LoRA adapters disabled."""

    def __init__(self, model: Transformer, adapters_off: bool, source: str):
        self.model, self.adapters_off, self.source = model, adapters_off, source

    def context(self) -> AbstractContextManager:
        """How the reference runs: the policy inside disable_adapters, or a frozen model inside
        distributed.frozen_forwards (which gives a sharded model's gathered weights back afterwards)."""
        if self.adapters_off:
            return disable_adapters(self.model)
        return frozen_forwards(self.model)

    def frozen_modules(self) -> list[Transformer]:
        """The reference's own model, when it has one (not when it is the policy with adapters off)."""
        return [] if self.adapters_off else [self.model]

    @torch.no_grad()
    def run(self, fn: Callable[[Transformer], torch.Tensor | tuple], *args):
        """fn(model, *args) under the reference (`context`), without gradient, in eval mode for the duration."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context():
                return fn(self.model, *args)
        finally:
            self.model.train(was_training)

    def fingerprint(self) -> str:
        """A hash of the reference's weights as it runs (the base weights when it is the policy with its adapters
        off), for cache keys."""
        h = hashlib.blake2b(digest_size=16)
        state = base_state_dict(self.model) if self.adapters_off else self.model.state_dict()
        for name, t in sorted(state.items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()


def build_reference(cfg: Config, tok: Tokenizer, policy: Transformer, ref_path: str, section: str,
                    device: torch.device | str, rank: int | None = None) -> Reference:
    """The reference of a policy (see the module docstring); call it before any training step.
    A [section] ref_model goes through build.prepare_backbone like every model a stage builds (the tokenizer
    must fit its embeddings) and must have the policy's vocabulary. rank: under torchrun, only rank 0 reads
    a ref_model (see build.build_model)."""
    if ref_path:
        ref = prepare_backbone(cfg, tok, load_model(ref_path, DTYPES[cfg.model.dtype], device, rank), ref_path,
                               section, "ref_model")
        if ref.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"[{section}] ref_model {ref_path!r} has a vocabulary of {ref.config.vocab_size}, "
                              f"the policy {policy.config.vocab_size}", section, "ref_model")
        source = ref_path
    elif has_lora(policy):
        return Reference(policy, adapters_off=True, source="the policy with its adapters disabled")
    else:
        ref = copy.deepcopy(policy)
        source = f"a frozen copy of {cfg.model.path or 'the fresh model'}"
    ref.requires_grad_(False)
    ref.eval()
    ref.activation_checkpointing = False  # it never runs backward
    return Reference(ref, adapters_off=False, source=source)


def non_finite_error(trainer: Trainer, what: str) -> TrainingError:
    """The one-line error of a rollout that went non-finite: where, and the checkpoint to go back to."""
    return TrainingError(f"non-finite {what} in the rollout of step {trainer.step + 1}; {trainer.last_good()}. "
                         f"Try a lower lr, fp32 precision, or check the models.")


@contextmanager
def non_finite_sampling(trainer: Trainer) -> Iterator[None]:
    """Sampling from NaN/inf logits (torch.multinomial's RuntimeError) becomes `non_finite_error`."""
    try:
        yield
    except RuntimeError as e:
        if "nan" not in str(e) or "inf" not in str(e):
            raise
        raise non_finite_error(trainer, "sampling probabilities (the policy's logits)") from None
