"""minirlhf: the LLM post-training pipeline (pt, sft, rm, ppo, dpo family, kto) in readable PyTorch.

Entry point: `python train.py --stage STAGE --config cfg.toml`. Public pieces: minirlhf.model.Transformer,
minirlhf.tokenizer.load_tokenizer, minirlhf.losses (every loss as a pure function of tensors).
"""

__version__ = "0.1.0"
