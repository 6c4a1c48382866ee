"""Box arithmetic in the one internal convention: conversions, areas, IoU, clipping, flips, scaling,
the box-regression deltas (R-CNN appendix C) and random windows.

Boxes are float ``x1, y1, x2, y2``: 0-based, continuous, no "+1" (docs/evaluation.md, box convention). A VOC box
``(xmin, ymin, xmax, ymax)`` (1-based inclusive pixels) is ``(xmin - 1, ymin - 1, xmax, ymax)``
here; with this convention the continuous IoU equals the devkit's inclusive "+1" IoU.
Conversions to and from VOC happen only at the loader and the result writer. numpy arrays on the
data side; torch tensors (any device) for scaling and deltas (the network's side).
"""
from __future__ import annotations

import numpy as np
import torch

# log-size deltas are clamped here so exp() cannot overflow (as torchvision's BoxCoder does)
MAX_LOG_DELTA = float(np.log(1000.0 / 16))


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


def random_windows(height: int, width: int, count: int, rng: np.random.Generator, min_side: float = 16.0) -> np.ndarray:
    """``float32 [count, 4]`` windows inside a ``height x width`` image: side lengths log-uniform
    between ``min_side`` and the image side (like selective-search boxes: many small, some large)."""
    w, h = (np.exp(rng.uniform(np.log(min(min_side, n)), np.log(n), count)) for n in (width, height))
    x1 = rng.uniform(0, 1, count) * (width - w)
    y1 = rng.uniform(0, 1, count) * (height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def scale_boxes(boxes: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """``Tensor[K, 4]`` in an image's pixels -> the same boxes in that image resized by ``fx, fy``
    (new / old)."""
    return boxes * boxes.new_tensor([fx, fy, fx, fy])


def _size_centre(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return w, h, boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h


def encode_deltas(proposals: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Regression targets of ``gt`` ``[N, 4]`` relative to ``proposals`` ``[N, 4]`` -> ``[N, 4]``:
    ``((Gx - Px) / Pw, (Gy - Py) / Ph, log(Gw / Pw), log(Gh / Ph))`` (centres and sizes, ``w = x2 - x1``)."""
    pw, ph, px, py = _size_centre(proposals.double())
    gw, gh, gx, gy = _size_centre(gt.double())
    pw, ph = pw.clamp(min=eps), ph.clamp(min=eps)
    return torch.stack([(gx - px) / pw, (gy - py) / ph,
                        torch.log(gw.clamp(min=eps) / pw), torch.log(gh.clamp(min=eps) / ph)], dim=1).to(proposals.dtype)


def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Move ``boxes`` ``[N, 4]`` by ``deltas`` ``[N, 4]`` or ``[N, K, 4]`` -> boxes of the same shape
    as ``deltas`` (the inverse of ``encode_deltas``; log-size deltas clamped at ``MAX_LOG_DELTA``)."""
    dtype = boxes.dtype
    boxes, deltas = boxes.double(), deltas.double()
    pw, ph, px, py = _size_centre(boxes)
    if deltas.dim() == 3:  # [N, K, 4]: broadcast the windows over the classes
        pw, ph, px, py = (v[:, None] for v in (pw, ph, px, py))
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw, dh = deltas[..., 2].clamp(max=MAX_LOG_DELTA), deltas[..., 3].clamp(max=MAX_LOG_DELTA)
    cx, cy = px + dx * pw, py + dy * ph
    w, h = pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1).to(dtype)


def apply_deltas_in_image(boxes: torch.Tensor, deltas: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``apply_deltas`` then clipped to the image ``width x height`` pixels (R-CNN clips too): test
    time's boxes ``[N, K, 4]``."""
    moved = apply_deltas(boxes, deltas)
    moved[..., 0::2] = moved[..., 0::2].clamp(0, width)
    moved[..., 1::2] = moved[..., 1::2].clamp(0, height)
    return moved
