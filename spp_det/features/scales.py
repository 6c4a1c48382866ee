"""Image scales: the shorter side resized to each configured scale, and each window's best scale.

The paper (Sec. 4.1) resizes the image so that min(w, h) = s for s in {480, 576, 688, 864, 1200}
(one-scale runs: 688), computes conv5 once per scale, and pools each window at the single scale
whose scaled window area is closest to 224 x 224 (the release aims at 208^2 = (13 * 16)^2 for ZF-5).
``max_size`` optionally caps the longer side (then the shorter one ends up below s).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class ScaledSize:
    """An image resized for one scale: ``height x width`` pixels, factors ``fy, fx`` (new / old)."""

    height: int
    width: int
    fy: float
    fx: float


def scaled_sizes(height: int, width: int, scales: Sequence[int], max_size: int | None = None) -> list[ScaledSize]:
    """One ``ScaledSize`` per scale for an image ``height x width`` (aspect ratio kept, rounded)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    out = []
    for s in scales:
        f = float(s) / min(height, width)
        if max_size and max(height, width) * f > float(max_size):
            f = float(max_size) / max(height, width)
        h, w = max(1, int(round(height * f))), max(1, int(round(width * f)))
        out.append(ScaledSize(h, w, h / height, w / width))
    return out


def resize_image(image: np.ndarray, size: ScaledSize) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``uint8 [size.height, size.width, 3]`` (bilinear, OpenCV)."""
    if image.shape[0] == size.height and image.shape[1] == size.width:
        return image
    return cv2.resize(image, (size.width, size.height), interpolation=cv2.INTER_LINEAR)


def best_scale(windows: Tensor, sizes: Sequence[ScaledSize], target_area: float) -> Tensor:
    """Index of the scale whose scaled window area is closest to ``target_area`` (224^2).

    ``windows`` ``Tensor[K, 4]`` image pixels -> ``Tensor[K]`` int64 in ``0..len(sizes)-1``.
    """
    if len(sizes) == 1 or windows.shape[0] == 0:
        return torch.zeros(windows.shape[0], dtype=torch.long, device=windows.device)
    area = ((windows[:, 2] - windows[:, 0]).clamp(min=0) * (windows[:, 3] - windows[:, 1]).clamp(min=0)).double()
    factor = torch.tensor([s.fx * s.fy for s in sizes], dtype=torch.float64, device=windows.device)
    scaled_area = area[:, None] * factor[None, :]  # [K, S]
    return (scaled_area - float(target_area)).abs().argmin(dim=1)
