"""A scalar head on a decoder backbone: the reward model, and the critic (value model) of ppo.

    values[b, t] = w . h[b, t]          (h: the backbone's final normed hidden state)
    score[b]     = values[b, last real token of row b]

The reward model is scored at each sequence's last real token: data.py ends every preference sequence
at the answer's end-of-turn token (eos, or chatml's <|im_end|>), the token where a generated answer
stops, so rm training and ppo scoring read the same position. It saves as Hugging Face's
`*ForSequenceClassification` with num_labels = 1
(backbone tensors plus `score.weight`, no bias), so transformers loads it and gives the same scores.
The mean and std of its scores on the training data are kept in config.json ("minirlhf_reward_stats")
so that ppo can normalise them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.checkpoint import (CheckpointError, config_to_hf, ours_to_hf, read_config, read_weights,
                                 write_model_dir)
from minirlhf.model import ModelConfig, Transformer

SEQ_CLS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


class ScalarHead(nn.Module):
    """Linear(d_model, 1) without bias, initialised N(0, 1/(d_model + 1)) as in Stiennon et al. 2020
    (and OpenAI's lm-human-preferences), so initial scores have unit-order variance."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.shape[1] + 1), generator=generator)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d] -> [...] in float32."""
        return (hidden.float() @ self.weight.float().t()).squeeze(-1)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding. [B, T] -> [B]."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


class RewardModel(nn.Module):
    """Decoder backbone (no LM head) + ScalarHead. Also the ppo critic, read at every position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone = Transformer(config)
        self.backbone.lm_head = None  # scores come from the head; the vocabulary projection is unused
        self.head = ScalarHead(config.hidden_size)
        self.reward_mean, self.reward_std = 0.0, 1.0

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One scalar per position: [B, T] -> [B, T] float32."""
        return self.head(self.backbone.hidden_states(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score of each sequence at its last real token: [B, T] -> [B] float32."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.values(input_ids, attention_mask)
        return values.gather(1, last_real_index(attention_mask)[:, None])[:, 0]

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores in units of the training set's spread: (s - mean) / std."""
        return (scores - self.reward_mean) / max(self.reward_std, 1e-8)

    # -- HF format -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None,
                        seed: int = 0) -> "RewardModel":
        """Load a saved reward model (`*ForSequenceClassification`), or start one from a causal LM
        directory (e.g. the sft model) with a freshly initialised head (seeded by `seed`)."""
        path = Path(path)
        config = read_config(path)
        hf = json.loads((path / "config.json").read_text())
        is_reward_model = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
        with torch.device("meta"):
            model = cls(config)
        state, extra = read_weights(path, model.backbone, config, dtype, device, allowed_extra=("score.weight",))
        model.backbone.load_state_dict(state, assign=True)
        if is_reward_model:
            if "score.weight" not in extra:
                raise CheckpointError(f"{path}: a sequence-classification checkpoint without score.weight")
            if extra["score.weight"].shape != (1, config.hidden_size):
                raise CheckpointError(f"{path}: score.weight has shape {tuple(extra['score.weight'].shape)}, "
                                      f"expected (1, {config.hidden_size}) (num_labels = 1)")
            model.head.weight = nn.Parameter(extra["score.weight"])
            stats = hf.get("minirlhf_reward_stats") or {}
            model.reward_mean = float(stats.get("mean", 0.0))
            model.reward_std = float(stats.get("std", 1.0))
        else:
            model.head.weight = nn.Parameter(
                torch.empty(1, config.hidden_size, dtype=dtype or torch.float32, device=device))
            model.head.reset_parameters(torch.Generator(device=model.head.weight.device).manual_seed(seed))
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        tensors = ours_to_hf(state, self.config)
        tensors["score.weight"] = self.head.weight.detach().cpu().contiguous()
        hf = config_to_hf(self.config, tensors["score.weight"].dtype)
        hf.update(architectures=[SEQ_CLS[self.config.model_type]], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  minirlhf_reward_stats={"mean": self.reward_mean, "std": self.reward_std})
        write_model_dir(path, hf, tensors, max_shard_size)
