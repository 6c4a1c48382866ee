"""Test-time post-processing: per-class scores and boxes of the windows -> final detections.

The steps follow the paper's test procedure (docs/ARCHITECTURE.md "Where each step of the paper lives"): scores above a threshold,
per-class non-maximum suppression at IoU 0.3, at most 100 detections per image. Boxes are in the
internal convention (0-based, continuous, image pixels; see ``spp_det.boxes``).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, remove_small_boxes

from spp_det.structures import Detections


def postprocess(
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    score_thresh: float,
    nms_iou: float = 0.3,
    max_per_image: int = 100,
    min_size: float = 1e-3,
) -> Detections:
    """Windows' per-class scores (and boxes) -> ``Detections``.

    ``boxes``: ``[N, K, 4]`` (class-specific boxes after box regression) or ``[N, 4]`` (the
    windows themselves, shared by every class); ``scores``: ``[N, K]``, column ``k`` is class
    ``k + 1`` (the background column, if a model has one, is dropped by the caller).
    Returns at most ``max_per_image`` detections sorted by score, descending.
    """
    scores = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores).float()
    boxes = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes).float()
    if scores.dim() != 2:
        raise ValueError(f"postprocess: scores must be [N, K], got shape {tuple(scores.shape)}")
    n, k = scores.shape
    if boxes.dim() == 2:  # one box per window, shared by every class
        boxes = boxes.reshape(n, 1, 4).expand(n, k, 4)
    boxes = boxes.reshape(n, k, 4)
    labels = torch.arange(1, k + 1, device=scores.device).reshape(1, k).expand(n, k)

    # one candidate per (window, class)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    # drop low scores (paper: SVM score > -1.5)
    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # drop empty boxes (box regression can collapse a window)
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # per-class NMS (paper: IoU 0.3); batched_nms returns indices sorted by score, descending
    keep = batched_nms(boxes, scores, labels, nms_iou)
    # keep the top max_per_image over all classes
    keep = keep[: int(max_per_image)]
    return Detections(boxes[keep], scores[keep], labels[keep])
