"""Projection of image windows onto conv5 cells (paper, appendix; and the original release).

Input: windows ``Tensor[K, 4]`` in the pixels of the resized image of their best scale (internal
convention: continuous x1, y1, x2, y2, 0-based). Output: ``Tensor[K, 4]`` int64 0-based inclusive
cell indices ``x1, y1, x2, y2`` on a conv5 map ``H x W``. Conv5 cell ``j`` (0-based) has its
receptive-field centre at pixel ``S * j + c`` (``S`` = stride, ``c`` = ``backbone.centre0``,
20 for ZF-5).

* ``paper``: "left/top x' = floor(x / S) + 1, right/bottom x' = ceil(x / S) - 1", where cell ``x'``
  has its receptive field centred at pixel ``S x'`` (a network padded by floor(p/2) everywhere);
  other paddings move the centres by ``c``: ``x1' = floor((x1 - c) / S) + 1``,
  ``x2' = ceil((x2 - c) / S) - 1``, 0-based. These are exactly the cells whose receptive-field
  centres lie strictly inside the window. No further "1-based" shift: ``c`` already places the
  cells (an earlier version subtracted one more cell and pooled every window one cell up-left).
* ``release``: SPP_net's ``spm_pool_caffe_mex.cpp`` / ``spm_response_boxes.m``: shrink the window
  by ``offset`` (6.5 px) and snap each edge to the nearest cell centre, with 1-based pixels
  ``l = x1 + 1``, ``r = x2`` and ``offset0 = c + 1`` (21 for ZF-5):
  ``x1' = floor((l - offset0 + offset) / S + 0.5)``, ``x2' = ceil((r - offset0 - offset) / S - 0.5)``
  (0-based; the release adds 1). The release scales boxes by ``(b - 1)(s - 1)/(m - 1) + 1``; here
  every box is scaled by the resize factor in the continuous convention.

Either way a window whose edges cross (too small for one cell) keeps one cell, the middle one
(``floor((x1' + x2') / 2)``, as the release does), and the cells are clamped into the map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spp_det.settings import PROJECTIONS


def project_windows(
    windows: Tensor,
    map_hw: tuple[int, int],
    stride: int,
    centre0: float,
    rule: str = "paper",
    release_shrink: float = 6.5,
) -> Tensor:
    """Image windows ``Tensor[K, 4]`` (scaled-image pixels) -> conv5 cells ``Tensor[K, 4]`` int64."""
    if rule not in PROJECTIONS:
        raise ValueError(f"model.projection must be one of {PROJECTIONS}, not {rule!r}")
    H, W = int(map_hw[0]), int(map_hw[1])
    w = windows.double()
    x1, y1, x2, y2 = w.unbind(1)
    S, c = float(stride), float(centre0)
    if rule == "paper":
        first = [torch.floor((v - c) / S) + 1 for v in (x1, y1)]
        last = [torch.ceil((v - c) / S) - 1 for v in (x2, y2)]
    else:
        # 1-based pixels l = x1 + 1, r = x2 and offset0 = c + 1 cancel the +1 on the left edge
        first = [torch.floor((v - c + release_shrink) / S + 0.5) for v in (x1, y1)]
        last = [torch.ceil((v - (c + 1) - release_shrink) / S - 0.5) for v in (x2, y2)]
    cells = []
    for lo, hi, size in ((first[0], last[0], W), (first[1], last[1], H)):
        crossed = lo > hi  # too small for one cell: keep the middle one
        mid = torch.floor((lo + hi) / 2)
        lo = torch.where(crossed, mid, lo).clamp(0, size - 1)
        hi = torch.where(crossed, mid, hi).clamp(0, size - 1)
        cells.append((lo, hi))
    (cx1, cx2), (cy1, cy2) = cells
    return torch.stack([cx1, cy1, cx2, cy2], dim=1).long()
