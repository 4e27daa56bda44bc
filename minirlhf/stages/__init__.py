"""The training stages, one module each (see minirlhf/commands/train.py for the table)."""
