"""Foreground / background windows for training (R-CNN's and SPP-net's sampling rule).

A window (a proposal, or a ground-truth box itself) is *foreground* when its IoU with some
ground-truth box is at least ``fg_iou`` (0.5 in the paper); its label is that box's class.
It is *background* (label 0) when its best IoU lies in ``[bg_iou[0], bg_iou[1])`` = [0.1, 0.5):
windows overlapping no object at all (IoU < 0.1) are left out, as in R-CNN/SPP-net, so the
background class learns the hard near misses. A mini-batch holds ``fg_fraction`` (25%)
foreground windows; when fewer are available the rest is background.

Pure numpy functions; every random choice takes a ``numpy.random.Generator`` so callers decide
the seeding (``spp_det.training.loop`` seeds one per step, which makes an interrupted run resumable
to the identical result).

Fine-tuning labels each image's windows once (``spp_det.training.windows``) and draws mini-batches
from the pooled windows (``sample_minibatch``); window pretraining draws one image's windows at a
time, all at one scale (``sample_scale_windows``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from spp_det.boxes import box_iou, clip_boxes


def trained_objects(record, use_difficult: bool = False) -> np.ndarray:
    """``bool [N]``: the ground-truth boxes of ``record`` that training uses as objects: every one with
    ``use_difficult``, else the non-difficult ones (the devkit ignores difficult objects)."""
    return np.ones(len(record.boxes), bool) if use_difficult else ~np.asarray(record.difficult, bool)


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


def sample_minibatch(
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


def jitter_boxes(boxes: np.ndarray, n: int, max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` random copies of random rows of ``boxes`` ``float32 [N, 4]``: centre shifted by up to
    ``max_shift`` of the width/height, width and height scaled by ``exp(U(-max_shift, max_shift))``.
    Returns ``float32 [n, 4]`` (not clipped)."""
    src = boxes[rng.integers(len(boxes), size=n)].astype(np.float64)
    wh = src[:, 2:] - src[:, :2]
    centre = (src[:, :2] + src[:, 2:]) / 2 + wh * rng.uniform(-max_shift, max_shift, (n, 2))
    wh = wh * np.exp(rng.uniform(-max_shift, max_shift, (n, 2)))
    return np.concatenate([centre - wh / 2, centre + wh / 2], 1).astype(np.float32)


def random_boxes(width: int, height: int, n: int, min_side: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` boxes ``float32 [n, 4]`` inside a ``width x height`` image, sides log-uniform between
    ``min_side`` and the image side (objects and proposals span that range)."""
    sides = np.exp(rng.uniform(np.log(min_side), np.log([max(width, min_side + 1), max(height, min_side + 1)]),
                               (n, 2)))
    sides = np.minimum(sides, [width, height])
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - sides)
    return np.concatenate([xy, xy + sides], 1).astype(np.float32)


def sample_scale_windows(rec, scale_of: Callable[[np.ndarray], np.ndarray], windows_per_image: int,
                         fg_fraction: float, fg_iou: float, rng: np.random.Generator, use_difficult: bool = False,
                         proposals: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Training windows of one image, sampled like detection's (R-CNN/SPP fine-tuning, Sec. 3.1.2 of
    the SPP paper: 25% foreground with IoU >= 0.5 to a ground-truth box, labelled with its class; the
    rest background, IoU < 0.5, label 0), all of ONE scale: ``(scale index, boxes float32 [K, 4]
    image pixels, labels int64 [K])``.

    ``scale_of(boxes [M, 4]) -> int [M]`` gives each window's best scale (``SPPNet``'s rule); the
    scale is that of a random ground-truth object (a random one when the image has none), and only
    candidates whose best scale it is are kept, so every window is pooled on the map detection would
    pool it on. Foreground: the ground-truth boxes and jittered copies; background: random boxes and
    jittered copies that fall below ``fg_iou``. ``proposals`` (``float32 [P, 4]`` of this image,
    as ``rec`` is: mirrored with it) and jittered copies of them join the candidates: the object-like
    non-objects (distractors, parts of objects) detection will have to reject.
    """
    keep = trained_objects(rec, use_difficult)
    gt, gt_labels = rec.boxes[keep].astype(np.float32), rec.labels[keep]
    min_side = 8.0
    candidates = [random_boxes(rec.width, rec.height, 400, min_side, rng)]
    if len(gt):
        candidates += [gt, jitter_boxes(gt, 300, 0.25, rng), jitter_boxes(gt, 200, 0.6, rng)]
    if proposals is not None and len(proposals):
        candidates += [proposals, jitter_boxes(proposals, 400, 0.1, rng)]
    boxes = clip_boxes(np.concatenate(candidates), rec.width, rec.height)
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh >= 2).all(1)]
    scales = scale_of(boxes)
    if len(gt):
        iou = box_iou(boxes, gt)
        best, arg = iou.max(1), iou.argmax(1)
        labels = np.where(best >= fg_iou, gt_labels[arg], 0).astype(np.int64)
        # a ground-truth box's best scale, computed from the box itself: boxes were filtered above, so a
        # position in ``boxes`` no longer names a ground-truth box
        j = int(rng.integers(len(gt)))
        s = int(scale_of(clip_boxes(gt[j:j + 1], rec.width, rec.height))[0])
    else:
        labels = np.zeros(len(boxes), np.int64)
        s = int(scales[rng.integers(len(scales))])
    on_scale = scales == s
    fg, bg = np.flatnonzero(on_scale & (labels > 0)), np.flatnonzero(on_scale & (labels == 0))
    n_fg = min(len(fg), int(round(windows_per_image * fg_fraction)))
    n_bg = min(len(bg), windows_per_image - n_fg)
    pick = np.concatenate([rng.choice(fg, n_fg, replace=False), rng.choice(bg, n_bg, replace=False)]).astype(np.int64)
    return s, boxes[pick], labels[pick]
