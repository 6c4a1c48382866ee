"""Spatial pyramid pooling (He et al. 2014, Sec. 2.3 and 4.1) as a public op, like torchvision's.

A window, already projected onto conv5 as 0-based inclusive cell indices ``x1..x2, y1..y2``
(``spp_det.features.projection``), is divided into an n x n grid for every pyramid level n.
Bin ``i`` of ``n`` over a length of ``w`` cells spans the cells

    floor(i * w / n)  ..  ceil((i + 1) * w / n) - 1          (0-based, inclusive)

(the paper's ``[floor((i-1)w/n), ceil(iw/n)]`` in 1-based bins, and the release's
``spm_pool_caffe_mex.cpp``), so neighbouring bins may share a cell and a window narrower than
n cells repeats cells instead of leaving bins empty. Each bin is max-pooled per channel.

How it is computed, and why it is exact:

* ``torchvision.ops.roi_pool`` on the integer cell boxes (``spatial_scale=1``) has exactly these
  bins: its ``roi_width = x2 - x1 + 1``, bin ``i`` spans ``floor(i * roi_width / n)`` to
  ``ceil((i + 1) * roi_width / n)`` (exclusive). The tests prove equality with a direct loop
  over the formula on random maps of odd sizes, values and gradients.
* Only the finest level (and any level that does not divide it) goes through ``roi_pool``: a
  coarser level m whose size divides the finest n (6 -> 3, 2, 1) is the max over r x r blocks of
  the finest bins (r = n / m), because the union of fine bins ``r*i .. r*i + r - 1`` is exactly
  coarse bin ``i`` (start ``floor(r*i*w/n) = floor(i*w/m)``, end ``ceil((i+1)*w/m) - 1``, and
  consecutive fine bins touch or overlap). That saves about half of the pooling time.
* Windows landing on identical cells (common among selective-search boxes) are pooled once (on
  this path; the fused kernel below is cheaper than finding them).

(A pure-torch sparse-table range-max variant was tried: exact, but its 4x gathered
intermediates make it memory-bound and slower than ``roi_pool`` on CPU.)

Everything is made of differentiable tensor ops (roi_pool, amax, index_select), so gradients flow
to the features for fine-tuning; the tests check values and gradients against a direct loop.

On the CPU a fused C++ kernel (``spp_cpu.cpp``, compiled once per machine on first use by
``spp_det.ops._ext``) replaces that path: it reads the maps channels-last, pools every level of
every window in one parallel pass with the same bins and the same "coarse levels from fine bins"
rule, and writes the output once in its final layout (issue 4: 2,000 windows on a 256 x 42 x 56
map). With ``features.requires_grad`` it also records the winning cell of every output value and
backpropagates by scatter-add, like ``roi_pool``. Without a compiler, on a compile error, on CUDA,
or with ``SPP_DET_NO_EXT=1`` the torchvision path above is used (one logged warning when the
kernel could not be built). Both paths give identical values; the tests compare them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from spp_det.ops import _ext

def pyramid_dim(channels: int, levels: Sequence[int]) -> int:
    """Length of a pooled vector: ``C * sum(n * n)`` (256 x 50 = 12,800 for ZF-5)."""
    return int(channels) * sum(int(n) * int(n) for n in levels)


def bin_edges(start, length, n: int):
    """First and last cell (0-based, inclusive) of the n bins along one axis.

    ``start``, ``length`` integer ``Tensor[K]`` (or numpy ``int64 [K]``: the onnxruntime path's pooling,
    ``spp_det.ops.spp_numpy``, uses this same rule) -> two ``[K, n]`` of the same kind:
    ``start + floor(i * length / n)`` and ``start + ceil((i + 1) * length / n) - 1``, in exact
    integer arithmetic (floating point would misplace edges where ``i * length / n`` is whole).
    """
    if isinstance(start, np.ndarray):
        i = np.arange(n, dtype=start.dtype)
    else:
        i = torch.arange(n, device=start.device, dtype=start.dtype)
    first = start[:, None] + (i[None, :] * length[:, None]) // n  # [K, n]; // floors for tensors and arrays
    last = start[:, None] - (-(i[None, :] + 1) * length[:, None]) // n - 1  # ceil(x) = -floor(-x)
    return first, last


def _roi_pool_level(features: Tensor, cells: Tensor, n: int) -> Tensor:
    """``Tensor[K, C, n, n]``: ``roi_pool`` with the paper's bins on integer cell boxes."""
    dtype = features.dtype
    if dtype not in (torch.float32, torch.float64):
        # Pool fp16/bf16 maps in float32 on every device: roi_pool's CPU kernel has no fp16/bf16
        # path, its CUDA kernel computes the bin edges in the map's dtype (fp16 rounds
        # ``i * w / n``, which can move an edge by a cell) and may lack bf16. Exact: the max of
        # fp16/bf16 values converted to float32 converts back to the same value.
        features = features.float()
    pooled = roi_pool(features, cells.to(features.dtype), output_size=(n, n), spatial_scale=1.0)
    return pooled.to(dtype)


def spatial_pyramid_pool(features: Tensor, cells: Tensor, levels: Sequence[int] = (6, 3, 2, 1)) -> Tensor:
    """Pool a fixed-length vector for every window from conv5 maps.

    Args:
        features: ``Tensor[N, C, H, W]`` conv5 maps (any float dtype, any device).
        cells: ``Tensor[K, 5]`` integer-valued ``(batch index, x1, y1, x2, y2)``: 0-based inclusive
            conv5 cell indices, ``0 <= x1 <= x2 < W``, ``0 <= y1 <= y2 < H`` (already projected).
        levels: pyramid levels n (n x n bins each), concatenated in this order; the paper's
            {6x6, 3x3, 2x2, 1x1} = 50 bins.

    Returns:
        ``Tensor[K, C * sum(n * n)]``, dtype of ``features``: per level, channel-major
        ``(c, row, column)`` max over the bins. ``K = 0`` gives ``Tensor[0, D]``.
    """
    levels = [int(n) for n in levels]
    if not levels or min(levels) < 1:
        raise ValueError(f"pyramid levels must be positive integers, got {levels}")
    if features.dim() != 4:
        raise ValueError(f"features must be Tensor[N, C, H, W], got shape {tuple(features.shape)}")
    N, C, H, W = features.shape
    dim = pyramid_dim(C, levels)
    cells = torch.as_tensor(cells, device=features.device)
    if cells.numel() == 0:
        return features.new_zeros((0, dim))
    if cells.dim() != 2 or cells.shape[1] != 5:
        raise ValueError(f"cells must be Tensor[K, 5] (batch, x1, y1, x2, y2), got shape {tuple(cells.shape)}")
    cells = cells.round().long() if cells.is_floating_point() else cells.long()
    b, x1, y1, x2, y2 = cells.unbind(1)
    bad = (b < 0) | (b >= N) | (x1 < 0) | (y1 < 0) | (x2 >= W) | (y2 >= H) | (x2 < x1) | (y2 < y1)
    if bool(bad.any()):
        row = cells[bad.nonzero()[0, 0]].tolist()
        raise ValueError(f"cells must lie inside the {N}x{H}x{W} maps with x1 <= x2, y1 <= y2; "
                         f"{int(bad.sum())} do not, e.g. {row}")

    if features.device.type == "cpu":
        ops = _ext.load()
        if ops is not None:
            return _fused_pool(ops, features, cells, levels)
    return _roi_pool_path(features, cells, levels)


def _channels_last(features: Tensor) -> Tensor:
    """``Tensor[N, H, W, C]`` contiguous float32/float64 view of ``features`` (one copy at most)."""
    dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    return features.to(dtype=dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1).contiguous()


class _FusedPyramidPool(torch.autograd.Function):
    """The fused kernel with gradients: each output value's gradient goes to its winning cell."""

    @staticmethod
    def forward(ctx, features: Tensor, cells: Tensor, levels: list[int], ops) -> Tensor:
        pooled, argmax = ops.pyramid_pool(_channels_last(features), cells, levels, True)
        ctx.save_for_backward(argmax)  # [K, D] flat indices into features viewed as [N*C*H*W]
        ctx.features_shape, ctx.features_dtype = features.shape, features.dtype
        return pooled.to(features.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (argmax,) = ctx.saved_tensors
        dtype = torch.float64 if ctx.features_dtype == torch.float64 else torch.float32
        grad_features = torch.zeros(ctx.features_shape.numel(), dtype=dtype)
        grad_features.index_add_(0, argmax.reshape(-1), grad.to(dtype).reshape(-1))
        return grad_features.view(ctx.features_shape).to(ctx.features_dtype), None, None, None


def _fused_pool(ops, features: Tensor, cells: Tensor, levels: list[int]) -> Tensor:
    """``Tensor[K, D]`` from the fused CPU kernel; ``cells`` are validated ``Tensor[K, 5]`` int64."""
    cells = cells.contiguous()
    if torch.is_grad_enabled() and features.requires_grad:
        return _FusedPyramidPool.apply(features, cells, levels, ops)
    pooled, _ = ops.pyramid_pool(_channels_last(features), cells, levels, False)
    return pooled.to(features.dtype)


def _roi_pool_path(features: Tensor, cells: Tensor, levels: list[int]) -> Tensor:
    """``Tensor[K, D]`` through torchvision's ``roi_pool`` (any device, differentiable)."""
    C = features.shape[1]
    # Identical cell boxes (frequent among proposals) are pooled once and copied back.
    unique, inverse = torch.unique(cells, dim=0, return_inverse=True)
    if unique.shape[0] == cells.shape[0]:  # no duplicates: keep the order, skip the copy back
        unique, inverse = cells, None

    finest = max(levels)
    pooled: dict[int, Tensor] = {}
    for n in [finest] + [m for m in dict.fromkeys(levels) if finest % m]:
        pooled[n] = _roi_pool_level(features, unique, n)  # [K', C, n, n]
    K = unique.shape[0]
    out = []
    for n in levels:
        if n not in pooled:  # n divides the finest level: max over r x r blocks of fine bins
            r = finest // n
            pooled[n] = pooled[finest].view(K, C, n, r, n, r).amax(dim=(3, 5))
        out.append(pooled[n].reshape(K, C * n * n))  # channel-major (c, row, column)
    out = torch.cat(out, dim=1)  # [K', D]
    return out if inverse is None else out.index_select(0, inverse)  # [K, D]


class SpatialPyramidPool(nn.Module):
    """``nn.Module`` wrapper of :func:`spatial_pyramid_pool`; ``out_dim(C)`` gives the length."""

    def __init__(self, levels: Sequence[int] = (6, 3, 2, 1)):
        super().__init__()
        self.levels = tuple(int(n) for n in levels)
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"pyramid levels must be positive integers, got {list(levels)}")

    @property
    def num_bins(self) -> int:
        return sum(n * n for n in self.levels)

    def out_dim(self, channels: int) -> int:
        return pyramid_dim(channels, self.levels)

    def forward(self, features: Tensor, cells: Tensor) -> Tensor:
        return spatial_pyramid_pool(features, cells, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, bins={self.num_bins}"
