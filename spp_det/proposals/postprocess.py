"""Post-processing shared by every backend: clip, drop small and duplicate boxes, keep the top.

Boxes are ``float32 [N, 4]`` in the internal convention (0-based continuous ``x1, y1, x2, y2``),
in the backend's ranking order (best first); every step keeps that order.
"""
from __future__ import annotations

import numpy as np

from spp_det.boxes import clip_boxes


def postprocess_boxes(boxes: np.ndarray, width: int, height: int, min_size: float, max_boxes: int | None) -> np.ndarray:
    """``Array[N, 4]`` ranked boxes -> ``float32 Array[M, 4]``, ``M <= max_boxes``.

    1. clip to the image ``[0, width] x [0, height]``;
    2. drop boxes with a side shorter than ``min_size`` pixels (degenerate windows pool nothing);
    3. drop exact duplicates, keeping the first (best ranked) copy;
    4. keep the first ``max_boxes`` (``None`` or ``<= 0``: all).
    """
    boxes = clip_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), width, height)
    wh = boxes[:, 2:] - boxes[:, :2]  # [N, 2]
    boxes = boxes[(wh >= max(float(min_size), 0.0)).all(axis=1) & (wh > 0).all(axis=1)]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]  # unique rows in their original (ranked) order
    if max_boxes is not None and int(max_boxes) > 0:
        boxes = boxes[: int(max_boxes)]
    return np.ascontiguousarray(boxes, dtype=np.float32)


def interleave(ranked_lists: list[np.ndarray]) -> np.ndarray:
    """Merge several ranked ``Array[N_i, 4]`` lists round-robin (1st of each, 2nd of each, ...).

    Used to merge the hierarchies of different diversification strategies or resolutions, so
    that any prefix (after ``max_boxes``) keeps boxes from every source. Duplicates are left
    for ``postprocess_boxes``.
    """
    lists = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in ranked_lists]
    lists = [b for b in lists if len(b)]
    if not lists:
        return np.zeros((0, 4), np.float32)
    total = sum(len(b) for b in lists)
    # Position of each box inside its own list; a stable sort by position interleaves.
    position = np.concatenate([np.arange(len(b)) for b in lists])
    source = np.concatenate([np.full(len(b), i) for i, b in enumerate(lists)])
    order = np.lexsort((source, position))
    merged = np.concatenate(lists)[order]
    assert len(merged) == total
    return merged
