"""Evaluation plots with matplotlib (headless: ``Figure`` objects, no pyplot, no display):
precision-recall curves, Hoiem error types per class, the confusion matrix."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from spp_det.io import atomic_path

# Hoiem error types' colours, in ERROR_TYPES order: correct green, then warmer the further from it.
ERROR_COLOURS = ("#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e", "#d62728")


def new_figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def pr_curves_figure(metrics: dict, title: str | None = None):
    """One subplot per class from ``VOCEvaluator.evaluate()``'s ``pr_curves``, AP07/AP10 in the
    titles; a class without ground truth says so."""
    classes = list(metrics["pr_curves"])
    cols = max(1, math.ceil(math.sqrt(len(classes))))
    rows = max(1, math.ceil(len(classes) / cols))
    fig = new_figure(3.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax, name in zip(axes.flat, classes):
        curve = metrics["pr_curves"][name]
        ap07, ap10 = metrics["ap_voc07"][name], metrics["ap_voc10"][name]
        if ap07 is None:
            ax.set_title(f"{name}: no ground truth", fontsize=9)
        else:
            ax.plot(curve["recall"], curve["precision"], lw=1.2)
            ax.set_title(f"{name}: AP07 {100 * ap07:.1f}, AP10 {100 * ap10:.1f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(classes):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    mean07, mean10 = metrics.get("map_voc07"), metrics.get("map_voc10")
    heading = title or "precision-recall"
    if mean07 is not None:
        heading += f" (mAP VOC07 {100 * mean07:.1f}, VOC10 {100 * mean10:.1f})"
    fig.suptitle(heading)
    return fig


def plot_pr_curves(metrics: dict, path: str | Path, title: str | None = None) -> Path:
    """``pr_curves_figure`` written atomically to ``path`` (PNG)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(pr_curves_figure(metrics, title)))
    return path


def error_types_figure(errors: dict[str, dict[str, int]], types):
    """Stacked horizontal bars: per class, the fractions of its top-ranked detections of each
    Hoiem type (``errors[class][type]`` counts, ``types`` in order)."""
    classes = [c for c in errors if sum(errors[c].values())]
    fig = new_figure(7.0, 0.9 + 0.32 * max(len(classes), 1))
    ax = fig.subplots()
    left = np.zeros(len(classes))
    for kind, colour in zip(types, ERROR_COLOURS):
        counts = np.array([errors[c][kind] for c in classes], np.float64)
        totals = np.array([sum(errors[c].values()) for c in classes], np.float64)
        share = counts / np.maximum(totals, 1)
        ax.barh(classes, share, left=left, color=colour, label=kind)
        left += share
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of the top-ranked detections (as many as the class has objects)")
    ax.legend(ncol=len(types), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    return fig


def confusion_figure(matrix: np.ndarray, classes):
    """Counts of ``matrix`` ``[K + 1, K + 1]`` (rows true class + background, columns predicted
    class + missed), coloured by the share of each row."""
    rows = [*classes, "background"]
    cols = [*classes, "missed"]
    side = 1.6 + 0.45 * len(rows)
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the row")
    return fig
