"""The report's figures: the confusion matrix (row-normalised, the most-confused classes when there
are many) and the reliability diagram (confidence against accuracy, with a histogram of
confidences). Only class names and numbers are drawn, never an example text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.calibrate import expected_calibration_error
from training.evaluate import IntSeq, reliability_bins

LABEL_CHARS = 28  # tick labels longer than this are cut: 600 OMIM names must stay legible


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in workers, CI or over ssh
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, chars: int = LABEL_CHARS) -> str:
    name = str(name)
    return name if len(name) <= chars else name[: chars - 1] + "…"


def most_confused_classes(y_true: IntSeq, y_pred: IntSeq, num_classes: int, k: int) -> np.ndarray:
    """The ``k`` classes (ascending ids) involved in the most errors, as the true class (missed) or
    the predicted one (wrongly given); ties, and classes without errors, go by test support."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if num_classes <= k:
        return np.arange(num_classes)
    wrong = y_true != y_pred
    mass = np.bincount(y_true[wrong], minlength=num_classes) + np.bincount(y_pred[wrong], minlength=num_classes)
    support = np.bincount(y_true, minlength=num_classes)
    return np.sort(np.lexsort((-support[:num_classes], -mass[:num_classes]))[:k])


def shown_confusion(y_true: IntSeq, y_pred: IntSeq, shown: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised confusion among ``shown`` classes: ``[len(shown), len(shown) + 1]``, the last
    column the share predicted as a class outside ``shown`` (so every row with examples sums to 1).
    Built without the full ``num_classes``-square matrix (4800 classes would be 184 MB)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(shown)
    position = np.full(num_classes, -1, dtype=np.int64)
    position[shown] = np.arange(k)
    rows = position[y_true]
    keep = rows >= 0
    cols = position[y_pred[keep]]
    cols[cols < 0] = k
    counts = np.zeros((k, k + 1), dtype=np.float64)
    np.add.at(counts, (rows[keep], cols), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_matrix_png(
    y_true: IntSeq, y_pred: IntSeq, labels: Sequence[str], path: str | Path, max_classes: int = 40
) -> Path:
    """Row-normalised confusion matrix as a PNG. With more than ``max_classes`` classes only the
    ``max_classes`` most-confused ones are drawn (the title says so) plus an "(other)" column for
    predictions outside them; long class names are truncated."""
    plt = _pyplot()
    n = len(labels)
    shown = most_confused_classes(y_true, y_pred, n, max_classes)
    matrix = shown_confusion(y_true, y_pred, shown, n)
    subset = len(shown) < n
    if not subset:
        matrix = matrix[:, :-1]  # nothing can fall outside: drop the empty "(other)" column
    k = len(shown)
    names = [_short(labels[i]) for i in shown]
    side = min(20.0, max(5.0, 0.26 * k + 3.5))
    font = 8 if k <= 20 else max(4, 8 - (k - 20) // 10)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
    ax.set_xticks(np.arange(matrix.shape[1]), names + (["(other)"] if subset else []), rotation=90, fontsize=font)
    ax.set_yticks(np.arange(k), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:  # values are readable only in small matrices
        for (r, c), value in np.ndenumerate(matrix):
            if value >= 0.005:
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=font - 1,
                        color="white" if value > 0.5 else "black")
    title = f"Confusion matrix, row-normalised ({n} classes, {len(np.asarray(y_true))} examples)"
    if subset:
        title = (f"Confusion matrix, row-normalised: the {k} most-confused of {n} classes\n"
                 f"(ranked by errors as true or predicted class; '(other)' = predicted outside these {k})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_diagram_png(probs: np.ndarray, y_true: IntSeq, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram of the top-1 prediction: accuracy per confidence bin against the
    diagonal (perfect calibration), the gap to the bin's mean confidence, ECE in the title; below
    it a histogram of the confidences."""
    plt = _pyplot()
    bins = reliability_bins(probs, y_true, n_bins)
    ece = expected_calibration_error(probs, y_true, n_bins)
    centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    width = 1.0 / n_bins
    has = bins["count"] > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[has], bins["accuracy"][has], width=width, color="tab:blue", edgecolor="black", label="accuracy")
    gap = bins["confidence"][has] - bins["accuracy"][has]
    top.bar(centers[has], gap, bottom=bins["accuracy"][has], width=width, color="tab:red", alpha=0.3,
            edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Reliability of the top-1 prediction: ECE = {ece:.3f} ({n_bins} bins, n = {len(probs)})", fontsize=10)
    bottom.bar(centers, bins["count"], width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("examples")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
