"""Foreground / background windows for fine-tuning (R-CNN's and SPP-net's sampling rule).

A window (a proposal, or a ground-truth box itself) is *foreground* when its IoU with some
ground-truth box is at least ``fg_iou`` (0.5 in the paper); its label is that box's class.
It is *background* (label 0) when its best IoU lies in ``[bg_iou[0], bg_iou[1])`` = [0.1, 0.5):
windows overlapping no object at all (IoU < 0.1) are left out, as in R-CNN/SPP-net, so the
background class learns the hard near misses. A mini-batch holds ``fg_fraction`` (25%)
foreground windows; when fewer are available the rest is background.

Pure numpy functions; every random choice takes a ``numpy.random.Generator`` so callers decide
the seeding (fine-tuning seeds one per iteration, which makes an interrupted run resumable to
the identical result).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spp_det.boxes import box_iou


@dataclasses.dataclass
class WindowLabels:
    """Per-window overlap with the ground truth.

    ``max_overlaps`` ``float32 [N]``: best IoU with a (used) ground-truth box, 0 with none;
    ``labels`` ``int64 [N]``: that box's class when ``max_overlaps >= fg_iou``, else 0;
    ``ignored`` ``bool [N]``: overlaps an excluded (difficult) box by ``>= fg_iou``: neither
    foreground nor background.
    """

    max_overlaps: np.ndarray
    labels: np.ndarray
    ignored: np.ndarray


def label_windows(
    windows: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    fg_iou: float = 0.5,
    ignore_boxes: np.ndarray | None = None,
) -> WindowLabels:
    """Label ``windows`` ``[N, 4]`` against ``gt_boxes`` ``[G, 4]`` with classes ``gt_labels`` ``[G]``.

    ``ignore_boxes`` ``[D, 4]`` (difficult objects when they are not trained on): a window
    covering one by ``>= fg_iou`` is marked ignored rather than called background.
    """
    windows = np.asarray(windows, dtype=np.float32).reshape(-1, 4)
    n = len(windows)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    if len(gt_boxes) and n:
        iou = box_iou(windows, gt_boxes)  # [N, G]
        best = iou.argmax(axis=1)
        max_overlaps = iou[np.arange(n), best].astype(np.float32)
        labels = np.where(max_overlaps >= fg_iou, gt_labels[best], 0).astype(np.int64)
    else:
        max_overlaps = np.zeros(n, np.float32)
        labels = np.zeros(n, np.int64)
    ignored = np.zeros(n, bool)
    if ignore_boxes is not None and len(ignore_boxes) and n:
        ignored = (box_iou(windows, ignore_boxes).max(axis=1) >= fg_iou) & (labels == 0)
    return WindowLabels(max_overlaps, labels, ignored)


def fg_bg_indices(
    window_labels: WindowLabels,
    fg_iou: float = 0.5,
    bg_iou: tuple[float, float] = (0.1, 0.5),
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``int64 [F]`` of foreground windows (IoU >= ``fg_iou``) and ``int64 [B]`` of
    background ones (IoU in ``[bg_iou[0], bg_iou[1])``), ignored windows in neither."""
    ov = window_labels.max_overlaps
    keep = ~window_labels.ignored
    fg = np.flatnonzero(keep & (ov >= fg_iou))
    bg = np.flatnonzero(keep & (ov >= bg_iou[0]) & (ov < bg_iou[1]) & (ov < fg_iou))
    return fg.astype(np.int64), bg.astype(np.int64)


def subsample(indices: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``indices``, drawn without replacement (all when ``limit`` is None),
    kept in their original order."""
    indices = np.asarray(indices, dtype=np.int64)
    if limit is None or len(indices) <= limit:
        return indices
    return np.sort(rng.choice(indices, size=int(limit), replace=False))


def sample_windows(
    fg_indices: np.ndarray,
    bg_indices: np.ndarray,
    batch_size: int,
    fg_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """One mini-batch: ``round(batch_size * fg_fraction)`` foreground indices (fewer when fewer
    exist) and background ones for the rest, each drawn without replacement.

    When background runs short too, the batch is topped up with more foreground windows; it is
    smaller than ``batch_size`` only when there are fewer windows than that in all.
    Returns ``(indices int64 [B], number of foreground windows)``, foreground first.
    """
    fg_indices = np.asarray(fg_indices, dtype=np.int64)
    bg_indices = np.asarray(bg_indices, dtype=np.int64)
    n_fg = min(int(round(batch_size * fg_fraction)), len(fg_indices))
    n_bg = min(batch_size - n_fg, len(bg_indices))
    n_fg = min(batch_size - n_bg, len(fg_indices))  # top up with foreground when background is short
    fg = rng.choice(fg_indices, size=n_fg, replace=False) if n_fg else np.empty(0, np.int64)
    bg = rng.choice(bg_indices, size=n_bg, replace=False) if n_bg else np.empty(0, np.int64)
    return np.concatenate([fg, bg]).astype(np.int64), n_fg
