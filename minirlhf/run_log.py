"""A run's logs: one JSON line of metrics per logged step in OUTPUT/metrics.jsonl (and TensorBoard when it
is installed), cut back to the resumed step on a resume, and the curves drawn into a PNG at the end."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)


class MetricsLog:
    """OUTPUT/metrics.jsonl (+ OUTPUT/tensorboard): `open(step)`, `write(row)` per logged step, `close()`.
    Only the main process writes; on the other ranks every call does nothing."""

    def __init__(self, out: Path, enabled: bool = True):
        self.out, self.enabled = Path(out), enabled
        self._file: TextIO | None = None
        self._tb = None

    def open(self, step: int) -> None:
        """metrics.jsonl, and every other per-step log (ppo's samples.jsonl), cut back to `step` so the
        curves of a resumed run continue without a seam; a line torn by a kill mid-write is dropped."""
        if not self.enabled:
            return
        for path in self.out.glob("*.jsonl"):
            kept, torn = [], 0
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    row, torn = None, torn + 1
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    kept.append(line)
            if torn:
                logger.warning("%s: dropped %d unreadable line(s) (cut by a kill mid-write)", path, torn)
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.out / "metrics.jsonl", "a")
        self._tb = _tensorboard(self.out / "tensorboard")

    def write(self, row: dict[str, Any]) -> None:
        """One line {"step": N, metric: value, ...}; every number also goes to TensorBoard."""
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def plot_metrics(metrics_path: Path, png_path: Path, keys: Iterator[str] | None = None) -> Path | None:
    """Draw every numeric metric of metrics.jsonl against step into one PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no %s: matplotlib is not installed (pip install matplotlib)", png_path.name)
        return None
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and (keys is None or k in keys):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(v)
    if not series:
        return None
    n = len(series)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, (k, (xs, ys)) in zip(axes.flat, sorted(series.items())):
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
