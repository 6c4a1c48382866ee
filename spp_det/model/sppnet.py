"""SPP-net: conv5 once per image and scale, a pyramid vector per window, fc6 -> fc7.

    image ─► resize to each scale ─► backbone ─► conv5 maps            (SPPNet.conv5; one scale: conv5_at)
    window ─► best scale ─► project onto conv5 ─► pyramid pooling      (SPPNet.pool5; one scale: pool5_at)
    pool5 ─► fc6 ─► ReLU ─► Dropout ─► fc7 ─► ReLU ─► Dropout           (SPPNet.fc7)

``conv5_at`` and ``pool5_at`` are the single-scale steps, differentiable (window pretraining trains
the conv layers through them); ``conv5`` / ``pool5`` run them over every scale. The model owns
tensors only: no losses in ``forward``, no file I/O (``spp_det.model.build`` loads weights; stages
and caches do the rest).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spp_det.errors import UserError
from spp_det.features.backbones import Backbone
from spp_det.features.projection import RULES, project_windows
from spp_det.features.scales import ScaledSize, best_scale, resize_image, scale_windows, scaled_sizes
from spp_det.ops import SpatialPyramidPool


class FCHead(nn.Module):
    """fc6 -> ReLU -> Dropout -> fc7 -> ReLU -> Dropout (paper: 4096-d each, dropout 0.5).

    ``Tensor[K, in_dim]`` -> ``Tensor[K, fc_dim]``; ``out_dim = fc_dim``.
    """

    def __init__(self, in_dim: int, fc_dim: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Linear(in_dim, fc_dim)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.in_dim, self.out_dim = int(in_dim), int(fc_dim)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the pool5 vectors fc6 takes: its first floating parameter's (float32 when fc6/fc7
        are int8, ``spp_det.inference``)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, pool5: Tensor) -> Tensor:
        return self.drop7(self.relu7(self.fc7(self.drop6(self.relu6(self.fc6(pool5))))))


def new_fc8(in_dim: int, num_classes: int, std: float = 0.01) -> nn.Linear:
    """A new classifier layer on fc7 (fine-tuning's (K+1)-way fc8, pretraining's classifier):
    weights N(0, std) (0.01 in the paper), bias 0."""
    fc8 = nn.Linear(in_dim, num_classes)
    nn.init.normal_(fc8.weight, std=std)
    nn.init.zeros_(fc8.bias)
    return fc8


class SPPNet(nn.Module):
    """Backbone + spatial pyramid + fc head, wired in the paper's data flow.

    Args: ``backbone`` (a :class:`Backbone`), ``pyramid`` (:class:`SpatialPyramidPool`), ``head``
    (:class:`FCHead`), ``scales`` (shorter sides, pixels), ``max_size`` (cap on the longer side or
    None), ``best_scale_area`` (target window area after scaling, px^2), ``projection``
    (``paper`` | ``release``).
    """

    def __init__(self, backbone: Backbone, pyramid: SpatialPyramidPool, head: FCHead, scales: Sequence[int],
                 max_size: int | None = None, best_scale_area: float = 224.0 ** 2, projection: str = "paper"):
        super().__init__()
        if projection not in RULES:
            raise UserError(f"model.projection must be one of {', '.join(RULES)}, not {projection!r}")
        if not scales or min(int(s) for s in scales) < 1:
            raise UserError(f"model.scales must be a non-empty list of positive sizes, got {list(scales)}")
        self.backbone, self.pyramid, self.head = backbone, pyramid, head
        self.scales = [int(s) for s in scales]
        self.max_size = int(max_size) if max_size else None
        self.best_scale_area = float(best_scale_area)
        self.projection = projection
        self.pool5_dim = pyramid.out_dim(backbone.out_channels)
        if head.in_dim != self.pool5_dim:
            raise ValueError(f"head takes {head.in_dim}-d input but the pyramid gives {self.pool5_dim}-d")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def conv5(self, image: np.ndarray) -> list[Tensor]:
        """RGB ``uint8 [H, W, 3]`` -> one conv5 map ``Tensor[1, C, h_s, w_s]`` per scale, on the device.

        Scales that ``max_size`` caps to the same size share one map (computed once).
        """
        sizes = scaled_sizes(image.shape[0], image.shape[1], self.scales, self.max_size)
        maps: dict[tuple[int, int], Tensor] = {}
        for size in sizes:
            if (size.height, size.width) not in maps:
                maps[size.height, size.width] = self.conv5_at(image, size)
        return [maps[size.height, size.width] for size in sizes]

    def conv5_at(self, image: np.ndarray, size: ScaledSize) -> Tensor:
        """RGB ``uint8 [H, W, 3]`` resized to ``size`` -> its conv5 map ``Tensor[1, C, h, w]`` (with
        gradients when enabled)."""
        return self.backbone(self.backbone.normalize(resize_image(image, size)))

    def pool5_at(self, fmap: Tensor, windows: Tensor, size: ScaledSize | None = None,
                 batch_index: Tensor | None = None) -> Tensor:
        """Pyramid vectors ``Tensor[K, pool5_dim]`` of ``windows`` ``float Tensor[K, 4]`` on ONE scale's
        conv5 maps ``fmap`` ``Tensor[B, C, h, w]``, differentiable w.r.t. ``fmap``.

        ``windows`` are image pixels scaled by ``size`` onto the map's input (None: already in the
        input's pixels), projected by ``projection``; ``batch_index`` ``[K]`` names each window's map
        (None: map 0).
        """
        if size is not None:
            windows = scale_windows(windows, size)
        cells = project_windows(windows, fmap.shape[-2:], self.backbone.stride, self.backbone.centre0,
                                self.projection, self.backbone.release_shrink)
        index = cells.new_zeros((cells.shape[0], 1)) if batch_index is None else batch_index.to(cells)[:, None]
        return self.pyramid(fmap, torch.cat([index, cells], dim=1))

    def pool5(self, conv5_maps: Sequence[Tensor], image_hw: tuple[int, int], windows) -> Tensor:
        """Pyramid vectors ``Tensor[K, pool5_dim]`` of image windows ``[K, 4]`` (image pixels).

        Each window is pooled at its best scale (scaled area closest to ``best_scale_area``),
        projected onto that scale's map by ``projection``. ``conv5_maps`` may be fp16 (a cache).
        """
        device, dtype = self.device, self.head.dtype
        windows = torch.as_tensor(np.asarray(windows, dtype=np.float32) if not torch.is_tensor(windows) else windows)
        windows = windows.to(device=device, dtype=torch.float32).reshape(-1, 4)
        if windows.shape[0] == 0:
            return torch.zeros((0, self.pool5_dim), device=device, dtype=dtype)
        sizes = scaled_sizes(int(image_hw[0]), int(image_hw[1]), self.scales, self.max_size)
        if len(conv5_maps) != len(sizes):
            raise ValueError(f"got {len(conv5_maps)} conv5 maps for {len(sizes)} scales")
        scale_of = best_scale(windows, sizes, self.best_scale_area)  # [K]
        out = torch.empty((windows.shape[0], self.pool5_dim), device=device, dtype=dtype)
        for s, (size, fmap) in enumerate(zip(sizes, conv5_maps)):
            chosen = (scale_of == s).nonzero().flatten()
            if chosen.numel() == 0:
                continue
            out[chosen] = self.pool5_at(fmap.to(device=device, dtype=dtype), windows[chosen], size)
        return out

    def fc7(self, pool5: Tensor) -> Tensor:
        """``Tensor[K, pool5_dim]`` -> ``Tensor[K, fc_dim]`` (``head``)."""
        return self.head(pool5)

    def forward(self, image: np.ndarray, windows) -> Tensor:
        """fc7 features ``Tensor[K, fc_dim]`` of the windows ``[K, 4]`` of one image."""
        return self.fc7(self.pool5(self.conv5(image), image.shape[:2], windows))

    @torch.no_grad()
    def features(self, image: np.ndarray, windows, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """``(pool5 [K, pool5_dim], fc7 [K, fc_dim])`` in eval mode without gradients, on the device,
        fc layers run ``batch_size`` windows at a time."""
        was_training = self.training
        self.eval()
        try:
            pool5 = self.pool5(self.conv5(image), image.shape[:2], windows)
            fc7 = torch.cat([self.fc7(chunk) for chunk in pool5.split(batch_size)]) if pool5.shape[0] \
                else pool5.new_zeros((0, self.head.out_dim))
        finally:
            self.train(was_training)
        return pool5, fc7
