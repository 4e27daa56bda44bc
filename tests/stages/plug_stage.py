"""A stage written the way docs/architecture.md says to add one, for tests/stages/test_registry.py: this one
file (with its config section) and one line in minirlhf.stages.REGISTRY, nothing else.

"toy" trains a policy on text with the language-model loss scaled by [toy] coef.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minirlhf.batching import BatchIterator
from minirlhf.build import apply_lora, build_model, build_tokenizer
from minirlhf.config import Config
from minirlhf.data import build_datasets
from minirlhf.logprobs import causal_lm_loss
from minirlhf.stages import StageSection, StageSpec
from minirlhf.stages.common import PolicyStage
from minirlhf.toml_fields import check, setting


@dataclass
class ToySection(StageSection):
    section = "toy"
    coef: float = setting(1.0, "factor of the language-model loss")

    def validate(self) -> None:
        check(self.coef > 0, self.section, "coef", "> 0", self.coef)


class ToyStage(PolicyStage):
    def __init__(self, cfg: Config, model, tok, train: list[dict], collate):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.batches = BatchIterator(train, cfg.train.micro_batch_size, collate, seed=cfg.data.seed)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.cfg.toy.coef * causal_lm_loss(self.model, batch)
        return loss, {"loss": loss.detach()}


def build_stage(cfg: Config, device: torch.device | str = "cpu", rank: int | None = None) -> ToyStage:
    tok = build_tokenizer(cfg)
    model = apply_lora(cfg, build_model(cfg, tok, device=device, rank=rank))
    data = build_datasets(cfg, tok, SPECS["toy"].data_formats)
    return ToyStage(cfg, model, tok, data.train, data.collate)


SPECS = {"toy": StageSpec(ToySection, data_formats=("text",), build=build_stage, rank0_loading=True)}
