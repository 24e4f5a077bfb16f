"""The evaluation plots: confusion matrix, reliability diagram, training curves (PNG, written atomically).

Apart from ``tasks.metrics`` so that what scores cases (the served model, triage) never imports
matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

# Headless rendering: the pipeline runs on servers and in workers without a display.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tasks.atomic import atomic_path
from tasks.metrics import curve_ece

PLOT_DPI = 120


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: Path,
    *,
    normalize: bool = True,
) -> None:
    """Confusion matrix heatmap (rows true, columns predicted), row-normalised by default.

    Normalised cells show the share of the true class (its recall on the diagonal) and the count.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(matrix, dtype=np.float64)
    names = [str(name) for name in class_names]
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"matrix must be {len(names)} x {len(names)} for classes {names}, got {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0) if normalize else counts

    side = max(4.0, 0.9 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    display = ConfusionMatrixDisplay(shown, display_labels=names)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format=".2f" if normalize else ".0f")
    display.im_.set_clim(0.0, 1.0 if normalize else max(float(shown.max()), 1.0))
    fig.colorbar(display.im_, ax=ax, label="share of true class" if normalize else "cases")
    if normalize:  # each cell: the share of its true class and, below, the count
        for (i, j), text in np.ndenumerate(display.text_):
            text.set_text(f"{shown[i, j]:.2f}\n({int(counts[i, j])})")
            text.set_fontsize(8)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix (rows normalised)" if normalize else "Confusion matrix")
    _save(fig, path)


def plot_reliability(curve: pd.DataFrame, path: Path, *, before: pd.DataFrame | None = None) -> None:
    """Reliability diagram from :func:`reliability_curve`: accuracy against confidence per bin.

    ``before``: the curve of the same cases before temperature scaling, drawn beside it.
    """
    missing = {"bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"} - set(curve.columns)
    if missing:
        raise ValueError(f"reliability curve lacks columns {sorted(missing)}")
    filled = curve[curve["count"] > 0]
    ece = curve_ece(curve)
    width = curve["bin_upper"] - curve["bin_lower"]
    centres = curve["bin_lower"] + width / 2

    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(centres, curve["accuracy"].fillna(0.0), width=width, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(filled["mean_confidence"], filled["accuracy"], "o-", color="C3", label=f"calibrated (ECE {ece:.3f})")
    title = f"Reliability diagram (ECE {ece:.3f})"
    if before is not None:
        raw = before[before["count"] > 0]
        ece_before = curve_ece(before)
        label = f"before temperature (ECE {ece_before:.3f})"
        ax.plot(raw["mean_confidence"], raw["accuracy"], "s:", color="C1", label=label)
        title = f"Reliability diagram (ECE {ece_before:.3f} before temperature scaling, {ece:.3f} after)"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy of the top label")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    ax_count.bar(centres, curve["count"], width=width, edgecolor="black", color="C0")
    ax_count.set_xlabel("Confidence (top-label probability)")
    ax_count.set_ylabel("Cases")
    _save(fig, path)


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and accuracy per epoch, train against validation, with the fine-tuning start marked.

    Uses whichever of ``loss, accuracy, val_loss, val_accuracy, val_balanced_accuracy`` are
    present. Epochs run on across phases; if ``epoch`` restarts per phase (or is absent) the
    row order is used instead.
    """
    if history.empty:
        raise ValueError("training history is empty: nothing to plot")
    history = history.reset_index(drop=True)
    if "epoch" in history and history["epoch"].is_monotonic_increasing:
        epoch = history["epoch"].to_numpy(dtype=np.float64)
        epoch_label = "Epoch"
    else:
        epoch = np.arange(1, len(history) + 1, dtype=np.float64)
        epoch_label = "Epoch (both phases, in order)"

    boundaries: list[tuple[float, str]] = []  # (x, legend label) where a new phase starts
    if "phase" in history:
        phase = history["phase"].astype(str).to_numpy()
        changes = np.flatnonzero(phase[1:] != phase[:-1]) + 1
        boundaries = [((epoch[i - 1] + epoch[i]) / 2, f"{phase[i]} phase starts") for i in changes]

    panels = {  # title -> {history column: legend label}
        "Loss": {"loss": "train loss", "val_loss": "validation loss"},
        "Accuracy": {
            "accuracy": "train accuracy",
            "val_accuracy": "validation accuracy",
            "val_balanced_accuracy": "validation balanced accuracy",
        },
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        drawn = [column for column in series if column in history and history[column].notna().any()]
        for column in drawn:
            style = "--" if column.startswith("val_") else "-"
            ax.plot(epoch, history[column], style, marker="o", markersize=3, label=series[column])
        for x, label in boundaries:
            ax.axvline(x, color="grey", linestyle=":", label=label)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(epoch_label)
        ax.set_ylabel(title.lower())
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    _save(fig, path)
