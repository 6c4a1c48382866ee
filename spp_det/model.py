"""SPP-net: conv5 once per image and scale, a pyramid vector per window, fc6 -> fc7.

    image ─► resize to each scale ─► backbone ─► conv5 maps            (SPPNet.conv5)
    window ─► best scale ─► project onto conv5 ─► pyramid pooling      (SPPNet.pool5)
    pool5 ─► fc6 ─► ReLU ─► Dropout ─► fc7 ─► ReLU ─► Dropout           (SPPNet.fc7)

The model owns tensors only: no losses in ``forward``, no file I/O (stages and caches do that).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spp_det.errors import UserError
from spp_det.features.backbones import Backbone, build_backbone
from spp_det.features.projection import RULES, project_windows
from spp_det.features.scales import best_scale, resize_image, scale_windows, scaled_sizes
from spp_det.ops import SpatialPyramidPool, spatial_pyramid_pool


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
                maps[size.height, size.width] = self.backbone(self.backbone.normalize(resize_image(image, size)))
        return [maps[size.height, size.width] for size in sizes]

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
            fmap = fmap.to(device=device, dtype=dtype)
            cells = project_windows(scale_windows(windows[chosen], size), fmap.shape[-2:], self.backbone.stride,
                                    self.backbone.centre0, self.projection, self.backbone.release_shrink)
            cells = torch.cat([cells.new_zeros((cells.shape[0], 1)), cells], dim=1)  # batch index 0
            out[chosen] = self.pyramid(fmap, cells)
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


def load_backbone_checkpoint(backbone: Backbone, path) -> None:
    """Load ``{"backbone": state_dict}`` (``spp-det pretrain``'s ``pretrain.pt``) into ``backbone``."""
    from pathlib import Path

    from spp_det.io import load_torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model.backbone_checkpoint not found")
    try:
        state = load_torch(path)
    except Exception as exc:  # a corrupt or foreign file
        raise UserError(f"{path}: cannot read backbone checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "backbone" not in state:
        raise UserError(f"{path}: not a backbone checkpoint (expected a dict with key 'backbone')")
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise UserError(f"{path}: backbone weights do not fit this model.backbone/model.width: {exc}") from None


def build_model(model_cfg) -> SPPNet:
    """``SPPNet`` from the ``model`` config group (``weights`` via torchvision enums, or
    ``backbone_checkpoint``; ``weights=None`` initialises randomly and downloads nothing)."""
    backbone = build_backbone(model_cfg)
    if model_cfg.get("backbone_checkpoint"):
        load_backbone_checkpoint(backbone, model_cfg.backbone_checkpoint)
    pyramid = SpatialPyramidPool([int(n) for n in model_cfg.pyramid_levels])
    head = FCHead(pyramid.out_dim(backbone.out_channels), int(model_cfg.fc_dim), float(model_cfg.dropout))
    return SPPNet(backbone, pyramid, head, scales=list(model_cfg.scales), max_size=model_cfg.get("max_size"),
                  best_scale_area=float(model_cfg.best_scale_area), projection=str(model_cfg.projection))


__all__ = ["FCHead", "SPPNet", "build_model", "load_backbone_checkpoint", "spatial_pyramid_pool"]
