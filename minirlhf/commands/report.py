"""The one report format of `minirlhf eval`: metrics with percentile-bootstrap 95% intervals, written as
JSON and printed as a markdown table.

Each metric is a mean over prompts (or documents) of a per-prompt value; its interval resamples the
prompts with replacement B times (seeded) and takes the 2.5th and 97.5th percentiles of the resampled
means (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13, the percentile interval).
Samples of one prompt stay together (a cluster bootstrap), so k samples per prompt do not count as k
independent observations. A ratio metric (perplexity) resamples numerator and denominator together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minirlhf.commands import CommandError

COMMAND = "minirlhf eval"


@dataclass
class Metric:
    """value with its 95% interval [low, high] (None when not bootstrapped) over n prompts/documents."""

    name: str
    value: float
    low: float | None
    high: float | None
    n: int
    description: str = ""


def bootstrap_interval(values: Sequence[float], resamples: int, seed: int,
                       weights: Sequence[float] | None = None,
                       transform: Callable[[float], float] = lambda x: x) -> tuple[float | None, float | None]:
    """Percentile 95% interval of transform(sum(w * v) / sum(w)) under resampling the items with replacement.

    values, weights: [n] (weights None: plain means). Returns (None, None) with no resamples or n < 2.
    """
    import numpy as np

    n = len(values)
    if resamples <= 0 or n < 2:
        return None, None
    v = np.asarray(values, dtype=np.float64)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (B, n)
    means = (v * w)[picks].sum(1) / np.maximum(w[picks].sum(1), 1e-300)  # (B,)
    low, high = np.percentile(means, [2.5, 97.5])
    return transform(float(low)), transform(float(high))


def mean_metric(name: str, values: Sequence[float], resamples: int, seed: int, description: str = "") -> Metric:
    """The mean of per-prompt values, with its bootstrap interval."""
    if not values:
        return Metric(name, math.nan, None, None, 0, description)
    low, high = bootstrap_interval(values, resamples, seed)
    return Metric(name, sum(values) / len(values), low, high, len(values), description)


@dataclass
class Report:
    """What `minirlhf eval` measured: the inputs and settings, the metrics, a few example answers."""

    inputs: dict
    settings: dict
    metrics: list[Metric] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def value(self, name: str) -> float | None:
        found = [m.value for m in self.metrics if m.name == name]
        return found[0] if found else None

    def to_json(self) -> dict:
        return {"command": COMMAND, "inputs": self.inputs, "settings": self.settings,
                "metrics": [asdict(m) for m in self.metrics], "examples": self.examples}

    def markdown(self) -> str:
        """The metrics as a markdown table, with a line saying how the intervals were made."""
        lines = ["| metric | value | 95% interval | n | what |", "| --- | ---: | --- | ---: | --- |"]
        for m in self.metrics:
            interval = f"[{m.low:.4g}, {m.high:.4g}]" if m.low is not None else "-"
            lines.append(f"| {m.name} | {m.value:.4g} | {interval} | {m.n} | {m.description} |")
        resamples = self.settings.get("bootstrap_resamples", 0)
        if resamples:
            lines.append("")
            lines.append(f"95% intervals: percentile bootstrap over prompts (documents for perplexity), {resamples} "
                         f"resamples, seed {self.settings.get('seed', 0)}.")
        return "\n".join(lines)


def check_report_path(path: str | Path) -> Path:
    """--out may be new, or a report of an earlier `minirlhf eval` (replaced); anything else is refused."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"--out {path} is a directory; give a .json file path")
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = None
        if not isinstance(previous, dict) or previous.get("command") != COMMAND:
            raise CommandError(f"--out {path} exists and is not a report of `{COMMAND}`; choose another --out or "
                               f"remove it")
    return path


def write_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
