"""The bundled demo: a generated review-writing task with a programmatic gold judge.

`task.py` holds the language (topics, prompts, a small sentence grammar) and the judge
(`gold_reward`, `gold_score`); `data.py` writes one data set per training stage. docs/demo.md explains
both; `python -m minirlhf.demo` runs the whole pipeline on them.
"""

from minirlhf.demo.data import (
    DEFAULT_SIZES,
    FILE_NAMES,
    build_demo_rows,
    generate_demo_data,
    tokenizer_corpus,
)
from minirlhf.demo.task import Judgement, gold_reward, gold_score, judge, prompt_topic

__all__ = [
    "DEFAULT_SIZES",
    "FILE_NAMES",
    "Judgement",
    "build_demo_rows",
    "generate_demo_data",
    "gold_reward",
    "gold_score",
    "judge",
    "prompt_topic",
    "tokenizer_corpus",
]
