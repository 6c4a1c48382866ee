"""Where a stage's weights start, decided by the config, never by which files happen to lie in
``work_dir``: the policy (``pretrain_skipped``, ``require_trained_backbone`` and its message),
the artifact each stage starts from (``backbone_source``: ``model.backbone_checkpoint`` or
``work_dir/pretrain.pt``; ``load_finetuned_model``: ``work_dir/finetune.pt``) and the network built
from it. Reading the files is ``spp_det.model.weights``'s job.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from spp_det import io
from spp_det.artifact import FINETUNE, PRETRAIN, work_file
from spp_det.errors import UserError
from spp_det.model import SPPNet, build_model
from spp_det.model.weights import load_state, read_checkpoint
from spp_det.settings import RunSettings

log = logging.getLogger(__name__)


def pretrain_skipped(rs: RunSettings) -> str | None:
    """Why this config does not pretrain its own backbone (ImageNet ``model.weights`` given, or
    ``pretrain.enabled=false``), None when it does (then ``spp-det pretrain`` writes
    ``work_dir/pretrain.pt`` and finetune starts from it): the one statement of the rule."""
    if rs.model.weights:
        return "ImageNet weights given"
    return None if rs.pretrain.enabled else "pretrain.enabled=false"


def backbone_source(rs: RunSettings) -> Path | None:
    """Where the conv weights come from, decided by the config, never by which files happen to
    exist: ``model.backbone_checkpoint`` when given; else ``work_dir/pretrain.pt`` when pretraining
    is configured (``pretrain_skipped`` gives no reason; a clear error when it has not run); else None
    (``model.weights``, or the model's own initialisation). Finetune records it in its artifact's meta."""
    if rs.model.backbone_checkpoint:
        path = Path(rs.model.backbone_checkpoint)
        if not path.is_file():
            raise UserError(f"model.backbone_checkpoint={path}: file not found")
        return path
    if pretrain_skipped(rs):
        return None
    pretrain = work_file(rs, PRETRAIN)
    if not pretrain.is_file():
        raise UserError(f"{pretrain}: not found; this config pretrains the backbone (pretrain.enabled=true and no "
                        "model.weights): run `spp-det pretrain` (or `spp-det train`) with this work_dir first")
    return pretrain


def require_trained_backbone(rs: RunSettings, pretrain_planned: bool = False) -> None:
    """Refuse to train detection on random conv layers (it runs for minutes and detects nothing):
    the backbone needs ``model.weights``, ``model.backbone_checkpoint`` or pretraining configured. ``allow_random_backbone=true`` opts out (tests)."""
    if rs.model.weights or pretrain_planned or not pretrain_skipped(rs) or rs.model.backbone_checkpoint \
            or rs.allow_random_backbone:
        return
    raise UserError(f"model.backbone={rs.model.backbone} has neither pretrained weights nor pretraining: its conv "
                    "layers are random and detection would learn nothing. Use an ImageNet backbone (the default "
                    "model=efficientnet_lite0 needs no download; or model.weights=IMAGENET1K_V1 / a weights file), "
                    "pretrain it (pretrain.enabled=true, e.g. pretrain.source=image_folder "
                    "pretrain.image_folder=/path/to/imagenet/train), or give model.backbone_checkpoint=pretrain.pt "
                    "(allow_random_backbone=true trains on random conv layers anyway)")


def describe_backbone(rs: RunSettings, source: Path | None) -> str:
    """Where the conv weights came from, as the artifacts record it: the backbone file, the
    ImageNet ``model.weights``, or the model's own (random) initialisation."""
    if source is not None:
        return str(source)
    weights = rs.model.weights
    return f"model.weights={weights}" if weights else "random initialisation"


def build_finetune_model(rs: RunSettings, source: Path | None) -> SPPNet:
    """The SPPNet fine-tuning (and the conv5 cache) starts from: its backbone from ``source`` (a
    ``pretrain.pt``, checked against the config) and fc6/fc7 from its pretrain head when the shapes
    match; ``source=None``: ``model.weights``."""
    model_settings, head_state = rs.model, None
    if source is not None:
        ckpt = read_checkpoint(source, ("backbone",), "a pretrain checkpoint")
        io.check_checkpoint(ckpt.get("meta", {}), rs.cfg, source)
        model_settings = dataclasses.replace(model_settings, backbone_checkpoint=str(source))
        head_state = ckpt.get("head")
    model = build_model(model_settings)
    if head_state is not None:
        own = model.head.state_dict()
        if all(k in head_state and head_state[k].shape == v.shape for k, v in own.items()):
            load_state(model.head, head_state, source, "pretrain head does not fit fc6/fc7")
            log.info("fc6/fc7 start from the pretrain head in %s", source)
        else:
            log.info("%s: head shapes differ from model.fc_dim; fc6/fc7 start fresh", source)
    return model


def load_finetuned_model(rs: RunSettings, device: torch.device) -> tuple[SPPNet, Path]:
    """The fine-tuned ``SPPNet`` from ``work_dir/finetune.pt`` in eval mode on ``device``, and
    that file's path: where svm and bboxreg start. The network is built without weights (the
    checkpoint holds every weight, so nothing is downloaded) and checked against the config's
    classes and network."""
    path = work_file(rs, FINETUNE)
    if not path.is_file():
        raise UserError(f"{path}: not found; run `spp-det finetune` (or `spp-det train`) with this work_dir first")
    state = read_checkpoint(path, ("state_dict",), "a fine-tuning checkpoint", "cannot read the fine-tuned checkpoint")
    io.check_checkpoint(state.get("meta", {}), rs.cfg, path)
    model = build_model(rs.model, pretrained=False)
    load_state(model, state["state_dict"], path, "weights do not fit the configured model")
    return model.to(device).eval(), path
