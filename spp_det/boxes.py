"""Box helpers in the one internal convention.

Boxes are float ``x1, y1, x2, y2``: 0-based, continuous, no "+1" (README "Evaluation", box convention). A VOC box
``(xmin, ymin, xmax, ymax)`` (1-based inclusive pixels) is ``(xmin - 1, ymin - 1, xmax, ymax)``
here; with this convention the continuous IoU equals the devkit's inclusive "+1" IoU.
Conversions to and from VOC happen only at the loader and the result writer.
"""
from __future__ import annotations

import numpy as np


def voc_to_internal(voc: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive ``Array[N, 4]`` -> internal ``Array[N, 4]`` float32."""
    out = np.asarray(voc, dtype=np.float32).reshape(-1, 4).copy()
    out[:, :2] -= 1.0
    return out


def internal_to_voc(boxes: np.ndarray) -> np.ndarray:
    """Internal ``Array[N, 4]`` -> VOC 1-based inclusive pixels ``Array[N, 4]`` float."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``Array[N, 4]`` -> ``Array[N]`` areas in square pixels (0 for empty boxes)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair: ``Array[N, 4]``, ``Array[M, 4]`` -> ``Array[N, M]`` float32.

    numpy twin of ``torchvision.ops.box_iou`` for the data side (proposal recall, sampling,
    evaluation), where the arrays already live in numpy.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip ``Array[N, 4]`` to the image ``[0, width] x [0, height]``."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror ``Array[N, 4]`` horizontally in an image ``width`` pixels wide."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out
