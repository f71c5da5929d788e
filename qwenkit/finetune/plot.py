"""loss.png: the training and validation loss curves of a run, from its metrics.jsonl.

matplotlib is optional (the `plot` extra): without it the plot is skipped and the caller says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qwenkit.files import atomic_path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, from a killed run, is ignored)."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(metrics_file: str | os.PathLike, out_file: str | os.PathLike) -> bool:
    """Draw loss (and eval_loss) against step into out_file; False when matplotlib is missing.

    Args:
        metrics_file: a run's metrics.jsonl.
        out_file: the PNG to write.
    """
    try:  # optional, and slow to import: only here
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and no GUI backend imported in a training job
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(out_file) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True
