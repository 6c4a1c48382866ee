"""What the two stages that train a head on the fine-tuned net (``svm``, ``bboxreg``) share: their
declaration and the start of their run (the fine-tuned net, the settings key, the current check),
so neither stage imports the other."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from spp_det import io
from spp_det.model import SPPNet
from spp_det.artifact import FINETUNE
from spp_det.runtime import resolve_device
from spp_det.stages import declare
from spp_det.stages.start import load_finetuned_model

log = logging.getLogger(__name__)


def head_stage(name: str, artifact: str, paper: str) -> declare.Stage:
    """The declaration of a head trained on the fine-tuned net: its own group, the model and the
    training data; the fine-tuned weights' bytes (every weight comes from them) and the proposals."""
    return declare.Stage(name, artifact, reads=(name, "model", *declare.TRAINING_DATA, "seed"),
                         consumes=("finetune", "proposals"),
                         ignores=("model.weights", "model.backbone_checkpoint", *declare.NOT_TRAINING_DATA), paper=paper)


def settings_key(cfg: DictConfig, stage: declare.Stage, finetune_path: Path) -> str:
    """``stage``'s settings key (``spp_det.stages.declare``) given the fine-tuned ``finetune_path``."""
    return declare.settings_key(cfg, stage, {"finetune": Path(finetune_path),
                                             "proposals": declare.proposals_cache(cfg.proposals)})


def start(cfg: DictConfig, stage: declare.Stage) -> tuple[SPPNet, torch.device, Path, str] | None:
    """``(fine-tuned net in eval mode on cfg.device, that device, work_dir/<artifact>, settings key)``,
    or None when that artifact is current (logged as skipped; the net is then not loaded: the key
    already covers the fine-tuned file's bytes)."""
    artifact = stage.path(cfg)
    finetune_path = Path(cfg.work_dir) / FINETUNE
    key = settings_key(cfg, stage, finetune_path) if finetune_path.is_file() else None
    if key is not None and io.artifact_is_current(artifact, key):
        log.info("%s: %s is current; skipped", stage.name, artifact)
        return None
    device = resolve_device(cfg.device)
    model, _ = load_finetuned_model(cfg, device)  # a missing or unreadable finetune.pt is its clear error
    return model, device, artifact, key
