"""The model stage: ``work_dir/model.pt`` assembled from the stage artifacts (``finetune.pt``,
``svm.pt``, ``bboxreg.pt`` when present) at the end of every ``spp-det train`` (cheap). Its layout
is ``spp_det.artifact``'s docstring."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from spp_det import artifact, io
from spp_det.errors import UserError
from spp_det.model.build import without_weights
from spp_det.settings import RunSettings

log = logging.getLogger(__name__)

def _stage_file(work_dir: Path, name: str, cfg: DictConfig, required: bool = True) -> dict | None:
    path = work_dir / name
    if not path.is_file():
        if required:
            raise UserError(f"{path}: not found; run `spp-det train` (or the stage that writes it) with this work_dir")
        return None
    try:
        state = io.load_torch(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a spp-det stage artifact")
    io.check_checkpoint(state.get("meta", {}), cfg, path)
    return state


def assemble(rs: RunSettings) -> Path:
    """Write ``work_dir/model.pt`` from ``finetune.pt``, ``svm.pt`` and (optional) ``bboxreg.pt``;
    returns its path. Each stage artifact is checked against the config's classes and network.
    ``rs``: the run's settings (model.pt stores the config's ``model`` group as composed)."""
    work_dir = Path(rs.work_dir)
    finetune = _stage_file(work_dir, artifact.FINETUNE, rs.cfg)
    svm = _stage_file(work_dir, artifact.SVM, rs.cfg)
    bboxreg = _stage_file(work_dir, artifact.BBOXREG, rs.cfg, required=False)
    if bboxreg is None:
        log.warning("%s: not found; the model has no box regressors (detection runs with bbox_reg off)",
                    work_dir / artifact.BBOXREG)
    model_cfg = without_weights(rs.cfg.model)  # the artifact holds every weight: rebuilding reads nothing else
    model = {
        "format": artifact.FORMAT,
        "version": artifact.VERSION,
        "classes": list(rs.data.classes),
        "config": model_cfg,
        "scales": [int(s) for s in rs.model.scales],
        "meta": io.checkpoint_meta(rs.cfg),
        "backbone_source": finetune.get("meta", {}).get("backbone_source"),  # recorded by finetune
        "state_dict": finetune["state_dict"],
        "fc8": finetune.get("fc8"),
        "svm": {"weight": svm["weight"], "bias": svm["bias"], "feature_scale": float(svm["feature_scale"])},
        "bboxreg": None if bboxreg is None else {"weight": bboxreg["weight"],
                                                 "feature_scale": float(bboxreg["feature_scale"])},
    }
    path = work_dir / artifact.MODEL
    io.save_torch(model, path)
    log.info("model: wrote %s (%d classes, box regression %s)", path, len(model["classes"]),
             "on" if bboxreg is not None else "off")
    return path
