"""Data types shared by several layers (detection writes them, evaluation and the report read them),
so that no layer imports another for a type.

- ``Detections``: the detections of one image (boxes, scores, labels).

(``ImageRecord``, one annotated image, stays with its reader in ``spp_det.data.voc``: every layer
already depends on the data layer.)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch


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


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
