"""SPP-net: conv5 once per image and scale, a pyramid vector per window, fc6 -> fc7.

    image ─► resize to each scale ─► backbone ─► conv5 maps            (SPPNet.conv5; one scale: conv5_at)
    window ─► best scale ─► project onto conv5 ─► pyramid pooling      (SPPNet.pool5; one scale: pool5_at)
    pool5 ─► fc6 ─► ReLU ─► Dropout ─► fc7 ─► ReLU ─► Dropout           (SPPNet.fc7)

The classifiers trained on the way share its modules: ``SPPClassifier`` (crop pretraining) and
``FCClassifier`` (fine-tuning).

``conv5_at`` and ``pool5_at`` are the single-scale steps, differentiable (window pretraining trains
the conv layers through them); ``conv5`` / ``pool5`` run them over every scale. The rules around the
network (which sizes, which scale per window, projection, pyramid, normalisation constants) are one
``Geometry``, the network's own and, read from ``spp_det_onnx.json``, the onnxruntime detector's. The
model owns tensors only: no losses in ``forward``, no file I/O (``spp_det.model.build`` loads weights;
stages and caches do the rest).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spp_det.errors import UserError
from spp_det.features.backbones import Backbone
from spp_det.features.projection import project_windows
from spp_det.boxes import scale_boxes
from spp_det.features.scales import ScaledSize, best_scale, resize_image, scaled_sizes
from spp_det.ops import SpatialPyramidPool, spatial_pyramid_pool
from spp_det.settings import PROJECTIONS


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


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every rule around the network's computations at its test scales: ``SPPNet.geometry``, and the
    ``model`` part of ``spp_det_onnx.json`` (``spp-det export``), from which the onnxruntime detector
    rebuilds it. Lengths in input pixels."""

    scales: tuple[int, ...]                  # shorter sides
    max_size: int | None                     # cap on the longer side
    best_scale_area: float                   # px^2: each window is pooled at the scale closest to it
    projection: str                          # paper | release (spp_det.features.projection)
    stride: int                              # conv5 cell spacing
    centre0: float                           # receptive-field centre of conv5 cell 0
    release_shrink: float
    pyramid_levels: tuple[int, ...]
    pixel_mean: tuple[float, float, float]   # per RGB channel, 0..255 pixel scale
    pixel_std: tuple[float, float, float]
    min_input: int                           # inputs smaller than this are zero-padded (bottom/right) first

    @classmethod
    def of(cls, fields: dict, scales=None, max_size=None) -> "Geometry":
        """From ``spp_det_onnx.json``'s ``model`` (lists read as tuples), at ``scales`` / ``max_size`` when given."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return cls(**{**fields, "scales": tuple(int(s) for s in (scales or fields["scales"])),
                      "max_size": max_size or fields["max_size"]})

    def cells(self, windows: Tensor, size: ScaledSize | None, map_hw: tuple[int, int]) -> Tensor:
        """Image-pixel ``windows`` ``float Tensor[K, 4]``, scaled by ``size`` (None: already in the input's
        pixels) -> their conv5 cells ``Tensor[K, 4]`` (0-based, inclusive) on a map of ``map_hw`` cells."""
        if size is not None:
            windows = scale_boxes(windows, size.fx, size.fy)
        return project_windows(windows, map_hw, self.stride, self.centre0, self.projection, self.release_shrink)

    def conv5_per_scale(self, image: np.ndarray, conv5_at: Callable[[np.ndarray, ScaledSize], object]) -> list:
        """``conv5_at(image, size)`` (a conv5 map) per scale of RGB ``uint8 [H, W, 3]``, once per distinct size."""
        maps: dict[tuple[int, int], object] = {}
        sizes = scaled_sizes(image.shape[0], image.shape[1], self.scales, self.max_size)
        for size in sizes:
            if (size.height, size.width) not in maps:
                maps[size.height, size.width] = conv5_at(image, size)
        return [maps[size.height, size.width] for size in sizes]

    def pool5_per_scale(self, maps: Sequence, image_hw: tuple[int, int], windows: Tensor, out: Tensor,
                        pool_at: Callable[[object, Tensor, ScaledSize], Tensor]) -> Tensor:
        """``out`` ``Tensor[K, D]`` filled with the pyramid vectors of image-pixel ``windows`` ``float Tensor[K, 4]``,
        each pooled at its best scale by ``pool_at(map, windows, size)`` on that scale's map of ``maps``."""
        sizes = scaled_sizes(int(image_hw[0]), int(image_hw[1]), self.scales, self.max_size)
        if len(maps) != len(sizes):
            raise ValueError(f"got {len(maps)} conv5 maps for {len(sizes)} scales")
        scale_of = best_scale(windows, sizes, self.best_scale_area)  # [K]
        for s, (size, fmap) in enumerate(zip(sizes, maps)):
            chosen = (scale_of == s).nonzero().flatten()
            if chosen.numel():
                out[chosen] = pool_at(fmap, windows[chosen], size)
        return out


class SPPNet(nn.Module):
    """Backbone + spatial pyramid + fc head, wired in the paper's data flow.

    Args: ``backbone`` (a :class:`Backbone`), ``pyramid`` (:class:`SpatialPyramidPool`), ``head``
    (:class:`FCHead`), ``scales`` (shorter sides, pixels), ``max_size`` (cap on the longer side or
    None), ``best_scale_area`` (target window area after scaling, px^2), ``projection``
    (``paper`` | ``release``).
    """

    def __init__(self, backbone: Backbone, pyramid: SpatialPyramidPool, head: FCHead, *, scales: Sequence[int],
                 max_size: int | None = None, best_scale_area: float = 224.0 ** 2, projection: str = "paper"):
        super().__init__()
        if projection not in PROJECTIONS:
            raise UserError(f"model.projection must be one of {', '.join(PROJECTIONS)}, not {projection!r}")
        if not scales or min(int(s) for s in scales) < 1:
            raise UserError(f"model.scales must be a non-empty list of positive sizes, got {list(scales)}")
        self.backbone, self.pyramid, self.head = backbone, pyramid, head
        self.geometry = Geometry(
            tuple(int(s) for s in scales), int(max_size) if max_size else None, float(best_scale_area), projection,
            int(backbone.stride), float(backbone.centre0), float(backbone.release_shrink), tuple(pyramid.levels),
            tuple(backbone.pixel_mean.flatten().tolist()), tuple(backbone.pixel_std.flatten().tolist()),
            int(backbone.min_input))
        self.pool5_dim = pyramid.out_dim(backbone.out_channels)
        if head.in_dim != self.pool5_dim:
            raise ValueError(f"head takes {head.in_dim}-d input but the pyramid gives {self.pool5_dim}-d")

    @property
    def scales(self) -> list[int]:
        return list(self.geometry.scales)

    @property
    def max_size(self) -> int | None:
        return self.geometry.max_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def conv5(self, image: np.ndarray) -> list[Tensor]:
        """RGB ``uint8 [H, W, 3]`` -> one conv5 map ``Tensor[1, C, h_s, w_s]`` per scale, on the device
        (``Geometry.conv5_per_scale``)."""
        return self.geometry.conv5_per_scale(image, self.conv5_at)

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
        cells = self.geometry.cells(windows, size, fmap.shape[-2:])
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
        out = torch.empty((windows.shape[0], self.pool5_dim), device=device, dtype=dtype)

        def pool_at(fmap: Tensor, chosen: Tensor, size: ScaledSize) -> Tensor:
            return self.pool5_at(fmap.to(device=device, dtype=dtype), chosen, size)
        return self.geometry.pool5_per_scale(conv5_maps, image_hw, windows, out, pool_at)

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


def whole_map_pyramid(conv5: torch.Tensor, levels) -> torch.Tensor:
    """Spatial pyramid pooling of each *whole* map: ``Tensor[B, C, h, w]`` -> ``Tensor[B, C * sum(n*n)]``.

    One window per image covering every conv5 cell, pooled by the same op detection uses
    (``spp_det.ops.spatial_pyramid_pool``), so fc6 sees the same vector layout here as on
    projected windows later.
    """
    b, _, h, w = conv5.shape
    cells = torch.zeros(b, 5, dtype=torch.float32, device=conv5.device)
    cells[:, 0] = torch.arange(b, dtype=torch.float32, device=conv5.device)
    cells[:, 3], cells[:, 4] = w - 1, h - 1  # inclusive last cell indices
    return spatial_pyramid_pool(conv5, cells, levels=tuple(int(n) for n in levels))


class SPPClassifier(nn.Module):
    """``backbone`` -> ``pool`` (whole-map pyramid) -> ``head`` (fc6, fc7) -> ``classifier``.

    ``forward(images float Tensor[B, 3, S, S], backbone-normalised)`` -> logits ``Tensor[B, classes]``;
    any ``S`` works (that is the point of the pyramid). With ``windows`` ``float Tensor[B, 4]``
    (input pixels) and a ``window_pool``, each image's window is pooled instead of its whole map.
    """

    def __init__(self, backbone: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, *,
                 num_classes: int, fc_dim: int, classifier_std: float = 0.01,
                 window_pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.window_pool = window_pool
        self.head = head
        self.classifier = new_fc8(fc_dim, num_classes, classifier_std)

    def forward(self, images: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor:
        conv5 = self.backbone(images)
        pooled = self.pool(conv5) if windows is None or self.window_pool is None else self.window_pool(conv5, windows)
        return self.classifier(self.head(pooled))


class FCClassifier(nn.Module):
    """``head`` (fc6 -> ReLU -> Dropout -> fc7 -> ReLU -> Dropout) followed by ``fc8``."""

    def __init__(self, head: nn.Module, fc8: nn.Linear):
        super().__init__()
        self.head, self.fc8 = head, fc8

    def forward(self, pool5: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.head(pool5))
