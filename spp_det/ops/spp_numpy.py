"""Spatial pyramid pooling in numpy: the onnxruntime path's pooling between its two graphs.

The same op as :func:`spp_det.ops.spatial_pyramid_pool` (same bins, from its :func:`bin_edges`;
same output layout; max is exact, so equal maps give bit-equal vectors, which tests/test_onnx.py
checks) for one scale's conv5 map that onnxruntime computed. Why not a graph op: torchvision's
``roi_pool`` does not export (spp_det/stages/export.py), and an ONNX ``MaxRoiPool`` graph would be a
second definition of the bins, in float arithmetic; here the bins come from the one definition the
torch op uses. numpy has no range-max op, hence the hand-written part below.

How: a 2-D sparse table (``T[a, b, r, c]`` = max over rows ``r .. r + 2^a - 1`` and columns
``c .. c + 2^b - 1``, built with ``log2`` doublings per axis) answers the max over any bin with four
overlapping lookups. Levels that divide the finest (6 -> 3, 2, 1) are taken as maxima over blocks of
fine bins, as the torch op does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spp_det.ops.spp import bin_edges, pyramid_dim


def _floor_log2(n: int) -> np.ndarray:
    """``int64 [n + 1]``: floor(log2(L)) for L = 1..n (entry 0 unused), in integers."""
    table = np.zeros(n + 1, np.int64)
    for length in range(2, n + 1):
        table[length] = table[length // 2] + 1
    return table


def _sparse_table(hwc: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``float32 [rows, cols, H, W, C]``: entry ``[a, b, r, c]`` is the max of ``hwc`` over rows
    ``r .. r + 2^a - 1`` and columns ``c .. c + 2^b - 1`` (entries past the map's edge: never read)."""
    H, W, C = hwc.shape
    table = np.empty((rows, cols, H, W, C), np.float32)
    table[0, 0] = hwc
    for a in range(1, rows):  # doubling the row span: two halves of span 2^(a-1)
        h = 1 << (a - 1)
        np.maximum(table[a - 1, 0, : H - 2 * h + 1], table[a - 1, 0, h: H - h + 1], out=table[a, 0, : H - 2 * h + 1])
    for b in range(1, cols):  # then the column span, for every row span
        w = 1 << (b - 1)
        np.maximum(table[:, b - 1, :, : W - 2 * w + 1], table[:, b - 1, :, w: W - w + 1],
                   out=table[:, b, :, : W - 2 * w + 1])
    return table


def spatial_pyramid_pool_numpy(fmap: np.ndarray, cells: np.ndarray, levels: Sequence[int] = (6, 3, 2, 1)) -> np.ndarray:
    """Pyramid vectors of windows on one conv5 map.

    Args:
        fmap: ``float32 [C, H, W]`` (or ``[1, C, H, W]``) conv5 map.
        cells: ``int [K, 4]`` 0-based inclusive cells ``x1, y1, x2, y2`` inside the map (projected).
        levels: pyramid levels n (n x n bins each), in output order.

    Returns:
        ``float32 [K, C * sum(n * n)]``: per level, channel-major ``(c, row, column)``, as
        :func:`spp_det.ops.spatial_pyramid_pool`.
    """
    fmap = np.asarray(fmap, np.float32)
    fmap = fmap[0] if fmap.ndim == 4 and fmap.shape[0] == 1 else fmap
    if fmap.ndim != 3:
        raise ValueError(f"fmap must be [C, H, W], got shape {fmap.shape}")
    C, H, W = fmap.shape
    levels = [int(n) for n in levels]
    cells = np.asarray(cells, np.int64).reshape(-1, 4)
    K = cells.shape[0]
    if K == 0:
        return np.zeros((0, pyramid_dim(C, levels)), np.float32)
    x1, y1, x2, y2 = cells.T
    if (x1 < 0).any() or (y1 < 0).any() or (x2 >= W).any() or (y2 >= H).any() or (x2 < x1).any() or (y2 < y1).any():
        raise ValueError(f"cells must lie inside the {H}x{W} map with x1 <= x2, y1 <= y2")

    finest = max(levels)
    direct = [finest] + [n for n in dict.fromkeys(levels) if finest % n]  # pooled from the map
    edges = {n: (bin_edges(y1, y2 - y1 + 1, n), bin_edges(x1, x2 - x1 + 1, n)) for n in direct}
    longest = max(max(int((last - first).max()) + 1 for first, last in (r, c)) for r, c in edges.values())
    log2 = _floor_log2(longest)
    rows_a = int(log2[min(longest, H)]) + 1
    cols_b = int(log2[min(longest, W)]) + 1
    table = _sparse_table(np.ascontiguousarray(fmap.transpose(1, 2, 0)), rows_a, cols_b).reshape(-1, C)

    pooled: dict[int, np.ndarray] = {}  # level -> [K, n, n, C]
    for n in direct:
        (r0, r1), (c0, c1) = edges[n]  # [K, n] each
        a, b = log2[r1 - r0 + 1], log2[c1 - c0 + 1]
        top, bottom = r0, r1 - (1 << a) + 1  # two row spans of 2^a covering the bin
        left, right = c0, c1 - (1 << b) + 1
        base = (a[:, :, None] * cols_b + b[:, None, :]) * H  # [K, n, n]
        out = None
        for r in (top, bottom):
            for c in (left, right):
                index = (base + r[:, :, None]) * W + c[:, None, :]  # [K, n, n] rows of the flat table
                values = table[index.reshape(-1)]
                out = values if out is None else np.maximum(out, values, out=out)
        pooled[n] = out.reshape(K, n, n, C)
    parts = []
    for n in levels:
        if n not in pooled:  # n divides the finest level: max over r x r blocks of fine bins
            r = finest // n
            pooled[n] = pooled[finest].reshape(K, n, r, n, r, C).max(axis=(2, 4))
        parts.append(pooled[n].transpose(0, 3, 1, 2).reshape(K, C * n * n))  # channel-major (c, row, column)
    return np.concatenate(parts, axis=1)
