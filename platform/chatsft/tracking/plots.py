"""Figures of a run, drawn off-screen: loss curves, and the shape of the prepared rows."""

from __future__ import annotations

from typing import Any, Optional

from chatsft import storage


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: dict[str, list[tuple[int, float]]]) -> Optional[Any]:
    """Train and eval loss by step in one figure."""
    series = {k: v for k, v in history.items() if k in ("train_loss", "eval_loss") and v}
    if not series:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for key, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_data(rows_dir: str, max_rows: int = 50_000) -> Optional[Any]:
    """Distributions of per-row supervision ratio and length, read from the prepared Parquet rows."""
    import numpy as np

    from chatsft.data.schema import IGNORE

    files = storage.list_files(rows_dir, suffix=".parquet")
    if not files:
        return None
    lengths, ratios = [], []
    for f in files:
        table = storage.read_parquet(f.path, columns=["input_ids", "labels"])
        for labels in table.column("labels").to_pylist():
            lab = np.asarray(labels)
            lengths.append(len(lab))
            ratios.append(float((lab != IGNORE).mean()) if len(lab) else 0.0)
            if len(lengths) >= max_rows:
                break
        if len(lengths) >= max_rows:
            break
    fig, (a, b) = _pyplot().subplots(1, 2, figsize=(10, 4))
    a.hist(ratios, bins=40)
    a.set_xlabel("supervised tokens / tokens (per row)")
    a.set_ylabel("rows")
    b.hist(lengths, bins=40)
    b.set_xlabel("tokens per row")
    fig.suptitle(f"{len(lengths)} rows of {storage.basename(rows_dir)}")
    fig.tight_layout()
    return fig


def plot_goodput(goodput: dict) -> Optional[Any]:
    """The run's wall time as one stacked bar: optimizer steps that survived, then each cause."""
    shares = {"steps": goodput["goodput"], **{k: v for k, v in goodput["shares"].items() if v > 0}}
    fig, ax = _pyplot().subplots(figsize=(7, 2.2))
    left = 0.0
    for name, share in shares.items():
        ax.barh([0], [share * 100], left=left * 100, label=f"{name} {share * 100:.1f}%")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of wall time from submission to the end")
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    return fig
