"""Training logs: `metrics.jsonl` (one JSON object per evaluation) and the `loss.png` plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmkit.fsutil import atomic_write_text

METRIC_KEYS = ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_sec")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (an empty list when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends eval records to `out_dir/metrics.jsonl` and redraws `out_dir/loss.png`."""

    def __init__(self, out_dir: str | Path, plot: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.plot_path = Path(out_dir) / "loss.png"
        self.plot = plot
        self.records = read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Forget records after `step` (a resumed run redoes them)."""
        self.records = [r for r in self.records if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any], plot: bool = True) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.plot and plot:
            plot_losses(self.records, self.plot_path)


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> None:
    """Train and val loss against step, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        pts = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_panels(records: list[dict[str, Any]], panels: list[tuple[str, list[str]]], path: str | Path) -> None:
    """One small chart per (title, keys) against step, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, ks) for t, ks in panels if any(r.get(k) is not None for r in records for k in ks)]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), "-", marker="." if len(pts) < 60 else None, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
