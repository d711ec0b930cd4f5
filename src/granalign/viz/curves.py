"""Training curves: loss, learning rate and dev rSum against the optimiser step, as one PNG.

The training loop keeps a list of plain dict rows and calls `plot_training_curves` at the end and after
every dev evaluation. A row holds any of `loss`, `lr` and `dev_rsum` (also read: `train/loss`,
`train/lr`, `rsum`, `dev/rsum`, so the loop's existing dev-history rows work as they are), with `step`
and optionally `epoch`:

    history.append({"step": 120, "epoch": 0, "loss": 0.41, "lr": 2e-4})   # a training step
    history.append({"step": 300, "epoch": 1, "dev_rsum": 231.5})          # a dev evaluation
    plot_training_curves(history, output_dir / "training_curves.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["SERIES_KEYS", "plot_training_curves", "training_curves_figure"]

# The series drawn, and the keys each is read from (first present wins).
SERIES_KEYS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "train/loss"),
    "lr": ("lr", "train/lr"),
    "dev_rsum": ("dev_rsum", "dev/rsum", "rsum"),
}
_EMA_MIN_POINTS = 20


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series(
    history: Sequence[dict[str, Any]],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[float]]:
    """Per series `(steps, values)` sorted by step, and the steps where a new epoch starts."""
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in SERIES_KEYS}
    epochs: dict[float, float] = {}
    for index, row in enumerate(history):
        if not isinstance(row, dict):
            raise TypeError(f"history[{index}] must be a dict, got {type(row).__name__}")
        step = _number(row.get("step"))
        if step is None:
            raise ValueError(f"history[{index}] has no numeric 'step': {row!r}")
        for name, keys in SERIES_KEYS.items():
            value = next((_number(row[key]) for key in keys if key in row), None)
            if value is not None:
                points[name].append((step, value))
        epoch = _number(row.get("epoch"))
        if epoch is not None:
            epochs[epoch] = min(epochs.get(epoch, step), step)
    series = {}
    for name, pairs in points.items():
        pairs.sort()
        series[name] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    starts = sorted(step for epoch, step in epochs.items() if epoch > min(epochs)) if epochs else []
    return series, starts


def _ema(values: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    smooth = np.empty_like(values)
    running = values[0]
    for index, value in enumerate(values):
        running = alpha * value + (1 - alpha) * running
        smooth[index] = running
    return smooth


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)


def training_curves_figure(history: Sequence[dict[str, Any]]) -> Figure:
    """The three panels (loss, learning rate, dev rSum) as a matplotlib figure."""
    if not history:
        raise ValueError("history is empty: nothing to plot (rows like {'step': 1, 'loss': 0.5, 'lr': 1e-4})")
    series, epoch_starts = _series(history)
    if not any(len(steps) for steps, _ in series.values()):
        raise ValueError(f"history has no 'loss', 'lr' or 'dev_rsum' values; first row: {history[0]!r}")
    figure = Figure(figsize=(13.5, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax_loss, ax_lr, ax_dev = figure.subplots(1, 3, sharex=True)
    steps, loss = series["loss"]
    if len(steps):
        ax_loss.plot(steps, loss, color="#4c72b0", alpha=0.45 if len(steps) >= _EMA_MIN_POINTS else 1.0,
                     linewidth=1, label="loss", marker="o" if len(steps) < _EMA_MIN_POINTS else None)  # fmt: skip
        if len(steps) >= _EMA_MIN_POINTS:
            ax_loss.plot(steps, _ema(loss), color="#c44e52", linewidth=1.8, label="moving average")
        ax_loss.legend(fontsize=8)
        ax_loss.set_ylabel("training loss")
    else:
        _empty(ax_loss, "no loss logged")
    ax_loss.set_title("Training loss")
    steps, lr = series["lr"]
    if len(steps):
        ax_lr.plot(
            steps, lr, color="#55a868", linewidth=1.5, marker="o" if len(steps) < _EMA_MIN_POINTS else None
        )
        if lr.min() > 0 and lr.max() / lr.min() > 20:
            ax_lr.set_yscale("log")
        else:
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.set_ylabel("learning rate")
    else:
        _empty(ax_lr, "no learning rate logged")
    ax_lr.set_title("Learning rate")
    steps, rsum = series["dev_rsum"]
    if len(steps):
        ax_dev.plot(steps, rsum, color="#8172b2", marker="o", linewidth=1.5)
        best = int(np.argmax(rsum))
        ax_dev.scatter(
            [steps[best]],
            [rsum[best]],
            s=120,
            facecolors="none",
            edgecolors="#c44e52",
            linewidths=2,
            zorder=3,
        )
        ax_dev.annotate(f"best {rsum[best]:.1f}", (steps[best], rsum[best]), textcoords="offset points",
                        xytext=(0, -16), ha="center", fontsize=8, color="#c44e52")  # fmt: skip
        ax_dev.set_ylabel("rSum (sum of six recalls)")
        ax_dev.set_title(f"Dev rSum (best {rsum[best]:.1f} at step {steps[best]:g})")
    else:
        _empty(ax_dev, "no dev evaluation yet")
        ax_dev.set_title("Dev rSum")
    for ax, name in ((ax_loss, "loss"), (ax_lr, "lr"), (ax_dev, "dev_rsum")):
        if len(series[name][0]):
            ax.set_xlabel("optimiser step")
            ax.tick_params(labelbottom=True)
            for start in epoch_starts:
                ax.axvline(start, color="0.6", linestyle=":", linewidth=0.8)
            ax.grid(alpha=0.25)
    note = " (dotted lines: epoch starts)" if epoch_starts else ""
    figure.suptitle(f"Training curves{note}", fontsize=11)
    return figure


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write loss, learning-rate and dev-rSum curves of `history` rows as one PNG at `path`; returns it.

    Rows: `{"step": int, "epoch": int (optional), "loss": float, "lr": float}` per logged training step and
    `{"step": int, "epoch": int, "dev_rsum": float}` per dev evaluation (a row may hold both). Missing
    series are drawn as an empty, labelled panel, so it can be called before the first evaluation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training_curves_figure(history).savefig(path)
    return path
