"""The stage registry: stage name -> the module that implements it. This table is the only list of stages;
the command line's --stage choices, the config sections, the data formats a stage may read and which
stages read their checkpoints on rank 0 alone all come from it.

A stage module declares what the rest of minirlhf asks of it in `SPECS`, one `StageSpec` per stage it
serves (sft.py serves pt and sft):

    section         its config section, a dataclass subclassing StageSection; [name] in a config file
    data_formats    the [data] format values it reads (data.FORMATS); "auto" means the first
    build           build(cfg, device, rank) -> trainer.Stage, the stage ready to train
    rank0_loading   under torchrun, rank 0 alone reads the checkpoints (build gets the rank; the other
                    ranks build on the meta device and the trainer fills them from rank 0)

The trainer talks to the built stage only through trainer.Stage. No stage module imports another:
what several share lives in stages/common.py (the policy base, the reference) and stages/rollout.py
(experience for online RL). Adding a stage is one file in stages/, its section, and one line below
(docs/architecture.md, "Adding a stage").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minirlhf.config import Config
    from minirlhf.trainer import Stage

REGISTRY: dict[str, str] = {
    "pt": "minirlhf.stages.sft",
    "sft": "minirlhf.stages.sft",
    "rm": "minirlhf.stages.rm",
    "dpo": "minirlhf.stages.dpo",
    "kto": "minirlhf.stages.kto",
    "ppo": "minirlhf.stages.ppo",
    "grpo": "minirlhf.stages.grpo",
}


class StageSection:
    """Base of a stage's config section (a dataclass of toml_fields.setting fields, `section` its name).

    validate() checks the section on its own, for every config; validate_run(cfg) what must hold only when
    this stage runs (a required path, a key of another section); longest_row(cfg) the most tokens one row
    of the run can hold and the [section] key that sets it (gpt2's learned positions must cover it).
    """

    section = ""

    def validate(self) -> None:
        pass

    def validate_run(self, cfg: Config) -> None:
        pass

    def longest_row(self, cfg: Config) -> tuple[int, str, str]:
        return cfg.data.cutoff_len, "data", "cutoff_len"


@dataclass(frozen=True)
class StageSpec:
    """What the rest of minirlhf asks of a stage (see the module docstring)."""

    section: type[StageSection]
    data_formats: tuple[str, ...]
    build: Callable[..., Stage]  # build(cfg, device="cpu", rank=None)
    rank0_loading: bool = False


def spec(stage: str) -> StageSpec:
    """The StageSpec of a registered stage (importing its module)."""
    return importlib.import_module(REGISTRY[stage]).SPECS[stage]


def new_sections() -> dict[str, Any]:
    """A fresh default section of every registered stage, by stage name, in registry order."""
    return {name: spec(name).section() for name in REGISTRY}
