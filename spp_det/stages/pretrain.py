"""``spp-det pretrain``: the backbone trained as an SPP classifier, for users without ImageNet weights.

This is how a user without ImageNet weights (offline, or with a new kind of imagery) gets a
backbone. With ImageNet weights (``model.weights``) it is skipped. By ``pretrain.source``:

* ``voc_crops`` (``pretrain_crops``): the paper's multi-size SPP classifier (Sec. 2.3, 3.1) on
  object crops of the training split: every non-difficult object padded by ``crop_context``, plus
  random background crops with IoU < 0.3 to every object;
* ``image_folder`` (``pretrain_crops``): the same on a class-per-folder image set;
* ``windows`` (``pretrain_windows``, not the paper): windows pooled from conv5 of whole images as
  detection pools proposals;
* ``crops+windows`` (both): ``voc_crops`` first (``work_dir/pretrain_crops.pt``), then ``windows``
  starting from those weights.

``pretrain.train_split`` may name a split detection never trains on (the demo's extra synthetic
``pretrain`` images, standing in for ImageNet).

Writes ``work_dir/pretrain.pt`` = ``{"backbone": state_dict, "head": fc6/fc7 state_dict,
"classifier": state_dict, "meta": checkpoint_meta(cfg) + sizes + settings, "history": [...]}``
atomically; ``work_dir/pretrain_state.pt`` holds a resumable checkpoint (``spp_det.training.loop``)
while it runs and is removed when the artifact is written. Rank 0 writes the checkpoints and the
artifact under ``torchrun``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from spp_det import io
from spp_det.artifact import PRETRAIN, PRETRAIN_CROPS, PRETRAIN_CROPS_STATE, PRETRAIN_STATE
from spp_det.settings import RunSettings
from spp_det.stages import declare, stage
from spp_det.stages.declare import Skipped
from spp_det.stages.pretrain_crops import run_crops
from spp_det.stages.pretrain_windows import run_windows, window_proposals
from spp_det.stages.start import pretrain_skipped

log = logging.getLogger(__name__)

ARTIFACT, STATE = PRETRAIN, PRETRAIN_STATE
CROPS_ARTIFACT, CROPS_STATE = PRETRAIN_CROPS, PRETRAIN_CROPS_STATE  # source=crops+windows: where windows start
CROPS, WINDOWS = stage("pretrain").keys  # the two phases' settings keys (spp_det.stages)


def settings_key(rs: RunSettings, phase: declare.Key | None = None) -> str:
    """The settings key of pretraining's ``phase`` (``CROPS`` or ``WINDOWS``; default: the one
    ``pretrain.source`` ends with), derived from its declaration (``spp_det.stages.declare``)."""
    if phase is None:
        phase = WINDOWS if rs.pretrain.source in ("windows", "crops+windows") else CROPS
    if phase is CROPS:
        return declare.settings_key(rs.cfg, CROPS)
    start = rs.pretrain.start_from
    return declare.settings_key(rs.cfg, WINDOWS, {
        "start_from": Path(start) if start and Path(start).is_file() else None,
        "proposals": declare.proposals_cache(window_proposals(rs))})  # the boxes change the windows


def run(cfg: DictConfig, on_epoch: Callable[[int, dict], None] | None = None) -> int:
    """Pretrain the backbone (see the module docstring); ``on_epoch(epoch, entry)`` is called after
    each epoch (tests use it to interrupt a run). Returns 0 (``Skipped`` when it did no work)."""
    rs = RunSettings.of(cfg)
    skipped = pretrain_skipped(rs)
    if skipped:
        log.info("pretrain: skipped: %s", skipped)
        return Skipped(skipped)
    work_dir = Path(rs.work_dir)
    artifact, state_path = work_dir / ARTIFACT, work_dir / STATE
    key = settings_key(rs)
    if io.artifact_is_current(artifact, key):
        return declare.current("pretrain", artifact)
    if rs.pretrain.source == "windows":
        return run_windows(rs, artifact, state_path, key, on_epoch)
    if rs.pretrain.source == "crops+windows":  # crops first, then windows starting from them
        crops = RunSettings.of(OmegaConf.merge(rs.cfg, {"pretrain": {"source": "voc_crops"}}))
        crops_artifact, crops_key = work_dir / CROPS_ARTIFACT, settings_key(crops, CROPS)
        if io.artifact_is_current(crops_artifact, crops_key):
            log.info("pretrain: %s is current; window training starts from it", crops_artifact)
        else:
            run_crops(crops, crops_artifact, work_dir / CROPS_STATE, crops_key, on_epoch)
        return run_windows(rs, artifact, state_path, key, on_epoch, start=crops_artifact)
    return run_crops(rs, artifact, state_path, key, on_epoch)
