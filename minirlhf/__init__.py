"""minirlhf: the LLM post-training pipeline (pt, sft, rm, ppo, dpo family, kto) in readable PyTorch.

Entry point: the `minirlhf` command (minirlhf/cli.py): `minirlhf train --stage STAGE --config cfg.toml`,
also `python -m minirlhf train ...` and `python train.py --stage STAGE --config cfg.toml`; then chat,
generate, eval, merge, export. Public pieces: minirlhf.model.Transformer, minirlhf.tokenizer.load_tokenizer,
minirlhf.losses (every loss as a pure function of tensors). docs/architecture.md maps the rest.
"""

__version__ = "0.1.0"
