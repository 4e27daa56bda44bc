"""The one base class of every error that is the user's to fix (a config key, a file, a data row).

The command line catches `UserError` and prints its one-line message, never a traceback; anything
else that escapes is a bug in minirlhf and keeps its traceback. Each module raises its own subclass
(ConfigError, DataError, CheckpointError, TrainingError, LoRAError, TokenizerError ...), whose message
names the file, line, section or key at fault.
"""


class UserError(Exception):
    """A problem with what the user gave us, explained in one line."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on: a non-finite or diverged loss (trainer.py), a checkpoint that does not fit the
    run or cannot be read (checkpointing.py)."""
