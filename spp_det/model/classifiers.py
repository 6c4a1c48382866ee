"""The networks trained as classifiers on the way to the detector (tensors only, like ``sppnet``):
crop pretraining's ``SPPClassifier`` (``spp_det.stages.pretrain_crops``) and fine-tuning's
``FCClassifier`` (``spp_det.stages.finetune``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spp_det.model.sppnet import new_fc8
from spp_det.ops import spatial_pyramid_pool


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
