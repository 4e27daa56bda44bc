"""Tiny artefacts for the tests: a SentencePiece tokenizer, a 2-layer llama directory, synthetic
preference / KTO data and a Config pointing at them. Everything is built in a temporary folder in a
second or two; nothing is downloaded. conftest.py shares the tokenizer as the session fixture `tiny_tok`.

The task of the synthetic data is trivial on purpose: every prompt asks about a topic, the preferred
(desirable) answer says it was "good", the dispreferred (undesirable) one that it was "bad". A model
only has to tell two words apart, so a few optimizer steps must move accuracy and margins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minirlhf import stages
from minirlhf.config import Config, load_config
from minirlhf.heads import RewardModel
from minirlhf.model import ModelConfig, Transformer
from minirlhf.tokenizer import Tokenizer
from minirlhf.tokenizer_training import train_sentencepiece
from minirlhf.trainer import Stage, Trainer

TOPICS = ("kettle", "movie", "hotel", "pizza", "camera", "garden", "novel", "phone", "album", "bicycle",
          "coffee", "museum", "jacket", "lamp", "sofa", "tent")

GOOD = ("good", "great", "lovely")
BAD = ("bad", "awful", "poor")


def prompt(i: int) -> str:
    return f"Review the {TOPICS[i % len(TOPICS)]}."


def answer(i: int, good: bool) -> str:
    words = GOOD if good else BAD
    return f"The {TOPICS[i % len(TOPICS)]} was {words[i % len(words)]}."


def preference_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": prompt(i), "chosen": answer(i, True), "rejected": answer(i, False), "score": 1.0 + i % 3}
            for i in range(offset, offset + n)]


def prompt_rows(n: int) -> list[dict]:
    """The first n prompts alone, as the rollout stages (ppo, grpo) read them."""
    return [{"prompt": prompt(i)} for i in range(n)]


def kto_rows(n: int, desirable_every: int = 2, offset: int = 0) -> list[dict]:
    """Every `desirable_every`-th row desirable, the others undesirable."""
    return [{"prompt": prompt(i), "completion": answer(i, i % desirable_every == 0),
             "label": i % desirable_every == 0} for i in range(offset, offset + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_tokenizer(out_dir: Path) -> Tokenizer:
    texts = [prompt(i) for i in range(len(TOPICS))] + [answer(i, g) for i in range(3 * len(TOPICS))
                                                       for g in (True, False)]
    return train_sentencepiece(texts * 4, str(out_dir), vocab_size=300, chat_template="chatml", num_threads=1)


def tiny_model_config(tok: Tokenizer, **overrides) -> ModelConfig:
    kw = {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
          "pad_token_id": tok.pad_id}
    return ModelConfig(**{**kw, **overrides})


def tiny_model_dir(out_dir: Path, tok: Tokenizer, seed: int = 0, **overrides) -> Path:
    """A freshly initialised tiny llama saved in HF format, with the tokenizer files next to it."""
    torch.manual_seed(seed)
    Transformer(tiny_model_config(tok, **overrides)).save_pretrained(out_dir)
    tok.save_pretrained(str(out_dir))
    return out_dir


def tiny_reward_model_dir(out_dir: Path, tok: Tokenizer, seed: int = 1, **overrides) -> Path:
    """A freshly initialised tiny reward model (the tiny llama with a scalar head) saved in HF format;
    overrides: ModelConfig fields."""
    torch.manual_seed(seed)
    RewardModel(tiny_model_config(tok, **overrides)).save_pretrained(out_dir)
    return out_dir


def tiny_config(stage: str, model_dir: Path, train_file: Path, output_dir: Path, *overrides: str,
                eval_file: Path | None = None) -> Config:
    """A validated Config for `stage` on the tiny model; overrides are `section.key=value` strings."""
    sets = [f"model.path={model_dir}", f"data.train_files=[{json.dumps(str(train_file))}]",
            f"train.output_dir={output_dir}", "train.lr=3e-3", "train.micro_batch_size=4",
            "train.warmup_steps=0", "train.schedule=\"constant\"", "train.log_every=1", "train.precision=\"fp32\"",
            "data.cutoff_len=64", "data.shuffle=false"]
    if eval_file is not None:
        sets.append(f"data.eval_files=[{json.dumps(str(eval_file))}]")
    return load_config(None, sets + list(overrides), stage=stage)


def tiny_stage(stage: str, files: dict, out: str, *overrides: str, steps: int = 0,
               train_file: Path | None = None) -> tuple[Stage, Trainer]:
    """`stage` built on a test module's tiny fixture (keys "model", "train", "eval" and "dir", the folder that
    receives output_dir `out`) by tiny_config, with its Trainer, after `steps` optimizer steps; train_file
    replaces files["train"]."""
    cfg = tiny_config(stage, files["model"], train_file or files["train"], files["dir"] / out, *overrides,
                      eval_file=files["eval"])
    built = stages.spec(stage).build(cfg)
    trainer = Trainer(cfg, built)
    for _ in range(steps):
        built.train_step(trainer)
    return built, trainer


def logps64(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference for sequence log-probs: a float64 copy of the model, its plain logits,
    log_softmax, and the labels' entries summed over labelled positions (position t predicts t+1).

    Returns (sums [B] float64, counts [B]).
    """
    import copy

    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logits = m(input_ids, attention_mask)[:, :-1]  # [B, T-1, V]
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1)


def constant_model_dir(out: Path, tok: Tokenizer, stop_logit: float, seed: int = 0, **config) -> Path:
    """A tiny llama whose next-token distribution ignores the context, so what it generates is known.

    Every embedding row is e_0 and the attention and MLP outputs are zero (o_proj = down_proj = 0), so
    the residual stream stays e_0 and the final hidden state is rmsnorm(e_0) = sqrt(d) e_0 at every
    position. The logits are then sqrt(d) * lm_head.weight[:, 0], set to N(0, 1) draws for ordinary
    tokens, exactly stop_logit for the stop tokens (eos and the template's <|im_end|>) and -50 for the
    other special tokens (so every answer has visible text). config: ModelConfig overrides.
    """
    tiny_model_dir(out, tok, seed=seed, **config)
    model = Transformer.from_pretrained(out)
    scale = math.sqrt(model.config.hidden_size)
    logits = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    logits[sorted(tok.special_ids)] = -50.0
    logits[tok.stop_ids] = stop_logit
    with torch.no_grad():
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / scale
    model.save_pretrained(out)
    return out
