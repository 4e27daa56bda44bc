"""A scalar head on a decoder backbone: the reward model, and the critic (value model) of ppo.

    values[b, t] = w . h[b, t]          (h: the backbone's final normed hidden state)
    score[b]     = values[b, last real token of row b]

The reward model is scored at each sequence's last real token: data.py ends every preference sequence
at the answer's end-of-turn token (eos, or chatml's <|im_end|>), the token where a generated answer
stops, so rm training and ppo scoring read the same position. It saves as Hugging Face's
`*ForSequenceClassification` with num_labels = 1
(backbone tensors plus `score.weight`, no bias), so transformers loads it and gives the same scores.
transformers finds that position by token id, not by attention mask: it reads the rightmost token that
is not config.pad_token_id. A tokenizer whose pad is its eos or end-of-turn token would move that read
one token to the left, so the export declares another pad token (`export_pad_id`) in config.json and
in the tokenizer files saved beside it.
The mean and std of its scores on the training data are kept in config.json ("minirlhf_reward_stats"),
read by ppo's `reward_norm = "rm"`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from minirlhf.checkpoint import (CheckpointError, config_to_hf, ours_to_hf, read_config, read_weights,
                                 write_model_dir)
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SEQ_CLS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


class NotARewardModel(CheckpointError):
    """A directory used as a reward model that holds another kind of model (a causal LM)."""


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
        # mean and std of the scores on the rm stage's training pairs; None when unknown
        self.reward_mean: float | None = None
        self.reward_std: float | None = None

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
        if self.reward_mean is None or self.reward_std is None:
            raise ValueError("RewardModel.normalize: this reward model has no saved score statistics")
        return (scores - self.reward_mean) / max(self.reward_std, 1e-8)

    # -- HF format -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None, seed: int = 0,
                        new_head: bool = False) -> "RewardModel":
        """Load a saved reward model (`*ForSequenceClassification`, num_labels = 1).

        new_head: also accept a causal LM directory (e.g. the sft model) and start a fresh head, seeded by
        `seed` (logged): what the rm stage and ppo's critic start from. A reward model to score with must
        not get one (its scores would be random), so by default that is an error.
        """
        path = Path(path)
        config = read_config(path)
        hf = json.loads((path / "config.json").read_text())
        is_reward_model = is_reward_model_config(hf)
        if not is_reward_model and not new_head:
            raise NotARewardModel(f"{path} is not a reward model: its config.json names {hf.get('architectures')}, "
                                  f"not a *ForSequenceClassification (the rm stage writes one), so its scores "
                                  f"would come from an untrained head")
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
            stats = hf.get("minirlhf_reward_stats")
            if stats is not None:
                try:
                    model.reward_mean, model.reward_std = float(stats["mean"]), float(stats["std"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{path / 'config.json'}: minirlhf_reward_stats must be "
                                          f"{{\"mean\": number, \"std\": number}}, got {stats!r}") from None
        else:
            logger.info("%s is a causal LM (%s): its scalar head starts fresh, N(0, 1/(d+1)) seeded by %d", path,
                        hf.get("architectures"), seed)
            model.head.weight = nn.Parameter(
                torch.empty(1, config.hidden_size, dtype=dtype or torch.float32, device=device))
            model.head.reset_parameters(torch.Generator(device=model.head.weight.device).manual_seed(seed))
        return model

    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None,
                        max_shard_size: int | str = "5GB") -> None:
        """Write the `*ForSequenceClassification` directory; with `tokenizer`, its files too, and both
        declare export_pad_id(tokenizer) as the pad token so transformers reads the position we score."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        tensors = ours_to_hf(state, self.config)
        tensors["score.weight"] = self.head.weight.detach().cpu().contiguous()
        hf = config_to_hf(self.config, tensors["score.weight"].dtype)
        hf.update(architectures=[SEQ_CLS[self.config.model_type]], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if self.reward_mean is not None and self.reward_std is not None:
            hf["minirlhf_reward_stats"] = {"mean": self.reward_mean, "std": self.reward_std}
        pad = export_pad_id(tokenizer) if tokenizer is not None else None
        if tokenizer is not None:
            hf["pad_token_id"] = pad if pad is not None else tokenizer.pad_id
        write_model_dir(path, hf, tensors, max_shard_size)
        if tokenizer is not None:
            save_tokenizer_with_pad(tokenizer, Path(path), pad)


def is_reward_model_config(hf: dict) -> bool:
    """Whether a config.json (as a dict) describes a sequence-classification model."""
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def export_pad_id(tok: Tokenizer) -> int | None:
    """The pad id an exported reward model declares. transformers' *ForSequenceClassification scores
    the rightmost token that is not the pad id, so the pad must differ from every token a scored sequence
    can end with (eos and the chat template's end-of-turn token): the tokenizer's own pad when it does,
    else its unk token, else None with a warning (no spare token to use). Never bos: TRL derives attention
    masks from `ids != pad`, which would then hide every sequence's first token."""
    ends = {tok.eos_id, *tok.stop_ids}
    for candidate in (tok.pad_id, tok.unk_id):
        if candidate is not None and candidate not in ends and candidate != tok.bos_id:
            return candidate
    logger.warning("the tokenizer's pad token %r is also an end token and it has no other to pad with: "
                   "transformers will score exported reward models one token before the end", tok.pad_token)
    return None


def save_tokenizer_with_pad(tok: Tokenizer, directory: Path, pad_id: int | None) -> None:
    """tok.save_pretrained(directory), with pad_token set to the token of pad_id (when given) in the files
    transformers reads it from (tokenizer_config.json, special_tokens_map.json)."""
    tok.save_pretrained(str(directory))
    if pad_id is None or pad_id == tok.pad_id:
        return
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if file.exists():
            data = json.loads(file.read_text(encoding="utf-8"))
            data["pad_token"] = tok.id_to_token(pad_id)
            file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
