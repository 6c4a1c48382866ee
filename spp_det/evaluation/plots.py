"""Precision-recall curves of every class in one PNG (matplotlib, headless Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path

from spp_det.io import atomic_path


def plot_pr_curves(metrics: dict, path: str | Path, title: str | None = None) -> Path:
    """One subplot per class from ``VOCEvaluator.evaluate()``'s ``pr_curves``, AP07/AP10 in the
    titles; a class without ground truth says so. Written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    classes = list(metrics["pr_curves"])
    cols = max(1, math.ceil(math.sqrt(len(classes))))
    rows = max(1, math.ceil(len(classes) / cols))
    fig = Figure(figsize=(3.0 * cols, 2.6 * rows), dpi=100, layout="constrained")
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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
