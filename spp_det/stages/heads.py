"""What the two stages that train a head on the fine-tuned net (``svm``, ``bboxreg``) share: what
their settings key consumes and the start of their run (the fine-tuned net, the settings key, the current check),
so neither stage imports the other."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from spp_det import io
from spp_det.model import SPPNet
from spp_det.artifact import FINETUNE
from spp_det.runtime import resolve_device
from spp_det.settings import RunSettings
from spp_det.stages import declare
from spp_det.stages.start import load_finetuned_model

log = logging.getLogger(__name__)


def settings_key(rs: RunSettings, declared: declare.Key, finetune_path: Path) -> str:
    """The settings key of a head's artifact (``declared``: svm's or bboxreg's, ``spp_det.stages.declare``)
    given the fine-tuned ``finetune_path``: it consumes that file and the proposals cache."""
    consumed = {"finetune": Path(finetune_path), "proposals": declare.proposals_cache(rs.proposals)}
    return declare.settings_key(rs.cfg, declared, consumed)


def start(rs: RunSettings, declared: declare.Key) -> tuple[SPPNet, torch.device, Path, str] | declare.Skipped:
    """``(fine-tuned net in eval mode on the run's device, that device, work_dir/<artifact>, settings key)``,
    or ``Skipped`` when that artifact is current (logged; the net is then not loaded: the key
    already covers the fine-tuned file's bytes)."""
    artifact = declared.path(rs)
    finetune_path = Path(rs.work_dir) / FINETUNE
    key = settings_key(rs, declared, finetune_path) if finetune_path.is_file() else None
    if key is not None and io.artifact_is_current(artifact, key):
        return declare.current(declared.name, artifact)
    device = resolve_device(rs.device)
    model, _ = load_finetuned_model(rs, device)  # a missing or unreadable finetune.pt is its clear error
    return model, device, artifact, key
