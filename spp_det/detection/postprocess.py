"""Test-time post-processing: per-class scores and boxes of the windows -> final detections.

The steps follow the paper's test procedure (DESIGN.md "Test"): scores above a threshold,
per-class non-maximum suppression at IoU 0.3, at most 100 detections per image. Boxes are in the
internal convention (0-based, continuous, image pixels; see ``spp_det.boxes``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision.ops import batched_nms, remove_small_boxes


@dataclasses.dataclass
class Detections:
    """Detections of one image.

    ``boxes`` ``float32 [D, 4]`` (x1, y1, x2, y2 internal convention, image pixels),
    ``scores`` ``float32 [D]`` (SVM scores, higher is more confident), ``labels`` ``int64 [D]``
    in 1..K (the order of ``data.classes``; 0 background never appears).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = _numpy(self.boxes, np.float32).reshape(-1, 4)
        self.scores = _numpy(self.scores, np.float32).reshape(-1)
        self.labels = _numpy(self.labels, np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(f"Detections: {len(self.boxes)} boxes, {len(self.scores)} scores, "
                             f"{len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def select(self, keep) -> "Detections":
        """The detections at index/mask ``keep``."""
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])

    @staticmethod
    def concat(parts: list["Detections"]) -> "Detections":
        if not parts:
            return Detections.empty()
        return Detections(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                          np.concatenate([p.labels for p in parts]))


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


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
