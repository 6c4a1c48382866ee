"""Building an ``SPPNet`` from the ``model`` config group, with its weights or without them.

``build_model(model_cfg)`` gives the backbone ``model.weights`` and then ``model.backbone_checkpoint``
(loaded by ``spp_det.model.weights``, the one place weights are loaded);
``build_model(..., pretrained=False)`` reads and downloads nothing: for a network whose every weight
comes from a checkpoint (``model.pt``, ``finetune.pt``) or a training phase that starts from scratch.
Which checkpoint a stage starts from is the stages' decision (``spp_det.stages.start``).
"""
from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf
from torch import nn

from spp_det.model.sppnet import FCHead, SPPNet
from spp_det.model.weights import build_backbone, load_backbone_checkpoint
from spp_det.ops import SpatialPyramidPool
from spp_det.settings import ModelSettings


def without_weights(model_cfg) -> dict:
    """The ``model`` config as a plain dict with its weight sources left out (``weights`` and
    ``backbone_checkpoint`` None, and ``checkpoint`` where the group still has it): what rebuilds
    a network whose every weight comes from a checkpoint."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    cfg.update(weights=None, backbone_checkpoint=None)
    if "checkpoint" in cfg:
        cfg["checkpoint"] = None
    return cfg


def build_model(model_cfg, pretrained: bool = True) -> SPPNet:
    """``SPPNet`` from the ``model`` config group (its ``ModelSettings``, a ``DictConfig`` or a plain dict).

    ``pretrained``: the backbone gets ``model.weights`` (torchvision enums, timm names, packaged or
    local files) and then ``model.backbone_checkpoint`` when set; False: every weight is random
    (the caller loads a checkpoint holding all of them, or trains from scratch): nothing is read
    or downloaded. ``weights=None`` also initialises randomly and downloads nothing.
    """
    model_cfg = ModelSettings.of(model_cfg)
    if not pretrained:
        model_cfg = dataclasses.replace(model_cfg, weights=None, backbone_checkpoint=None)
    backbone = build_backbone(model_cfg)
    if model_cfg.backbone_checkpoint:
        load_backbone_checkpoint(backbone, model_cfg.backbone_checkpoint)
    pyramid = SpatialPyramidPool([int(n) for n in model_cfg.pyramid_levels])
    head = FCHead(pyramid.out_dim(backbone.out_channels), int(model_cfg.fc_dim), float(model_cfg.dropout))
    return SPPNet(backbone, pyramid, head, scales=list(model_cfg.scales), max_size=model_cfg.max_size,
                  best_scale_area=float(model_cfg.best_scale_area), projection=str(model_cfg.projection))


def at_scales(model: SPPNet, scales) -> SPPNet:
    """The same network at other ``scales``: its modules (so its weights) shared, nothing loaded or copied."""
    g = model.geometry
    return SPPNet(model.backbone, model.pyramid, model.head, scales=list(scales), max_size=g.max_size,
                  best_scale_area=g.best_scale_area, projection=g.projection)


def init_from_scratch(backbone: nn.Module) -> None:
    """He (Kaiming) normal initialisation of the conv layers, zero biases (``pretrain.init=kaiming``).

    Why: the paper's Caffe nets start from Gaussians of fixed std (0.01), which the original
    authors could afford to train for ~70 ImageNet epochs; a small network trained from scratch
    in a few CPU minutes needs the signal to keep its scale through the layers from the first
    step (He et al., "Delving Deep into Rectifiers", 2015), or it stays at the class prior.
    """
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
