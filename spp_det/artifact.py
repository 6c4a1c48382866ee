"""The model artifact ``work_dir/model.pt``: everything detection needs, in one file.

Assembled from the stage artifacts (``finetune.pt``, ``svm.pt``, ``bboxreg.pt`` when present) and
loadable with ``torch.load(..., weights_only=True)`` (only tensors, numbers, strings, lists and
dicts: never arbitrary pickles). Layout (format ``FORMAT``, version ``VERSION``)::

    {"format": "spp-det-model", "version": 1,
     "classes": [K names], "config": the model config group as a dict (weights=None),
     "scales": [shorter sides], "meta": checkpoint_meta, "backbone_source": where the conv weights came from,
     "state_dict": SPPNet state_dict (backbone + fc6/fc7), "fc8": {"weight" [K+1, D], "bias" [K+1]},
     "svm": {"weight" [K, D], "bias" [K], "feature_scale": float},
     "bboxreg": {"weight" [K, D_pool5 + 1, 4], "feature_scale": float} or None}
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from spp_det import io
from spp_det.errors import UserError
from spp_det.model.build import without_weights
from spp_det.stages import declare

log = logging.getLogger(__name__)

FORMAT = "spp-det-model"
VERSION = 1
ARTIFACT = "model.pt"
# assembled at the end of every `spp-det train` (cheap): everything detection needs in one file
STAGE = declare.Stage("model", ARTIFACT, reads=("model", "data.classes"), consumes=("finetune", "svm", "bboxreg"),
                      paper="the detector of Sec. 4.1 (fc7 -> SVM scores, box regression)")


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


def assemble(cfg: DictConfig) -> Path:
    """Write ``work_dir/model.pt`` from ``finetune.pt``, ``svm.pt`` and (optional) ``bboxreg.pt``;
    returns its path. Each stage artifact is checked against the config's classes and network."""
    work_dir = Path(cfg.work_dir)
    finetune = _stage_file(work_dir, "finetune.pt", cfg)
    svm = _stage_file(work_dir, "svm.pt", cfg)
    bboxreg = _stage_file(work_dir, "bboxreg.pt", cfg, required=False)
    if bboxreg is None:
        log.warning("%s: not found; the model has no box regressors (detection runs with bbox_reg off)",
                    work_dir / "bboxreg.pt")
    model_cfg = without_weights(cfg.model)  # the artifact holds every weight: rebuilding reads nothing else
    artifact = {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(cfg.data.classes),
        "config": model_cfg,
        "scales": [int(s) for s in cfg.model.scales],
        "meta": io.checkpoint_meta(cfg),
        "backbone_source": finetune.get("meta", {}).get("backbone_source"),  # recorded by finetune
        "state_dict": finetune["state_dict"],
        "fc8": finetune.get("fc8"),
        "svm": {"weight": svm["weight"], "bias": svm["bias"], "feature_scale": float(svm["feature_scale"])},
        "bboxreg": None if bboxreg is None else {"weight": bboxreg["weight"],
                                                 "feature_scale": float(bboxreg["feature_scale"])},
    }
    path = work_dir / ARTIFACT
    io.save_torch(artifact, path)
    log.info("model: wrote %s (%d classes, box regression %s)", path, len(artifact["classes"]),
             "on" if bboxreg is not None else "off")
    return path


def load(path: str | Path) -> dict:
    """Read a model artifact (``weights_only=True``); a clear ``UserError`` when the file is
    missing, unreadable, or not a model artifact of a format this version reads."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found (eval.checkpoint / detect.checkpoint); `spp-det train` writes work_dir/model.pt")
    try:
        artifact = io.load_torch(path)
    except Exception as exc:  # truncated, corrupt, or a pickle with arbitrary objects
        # not torch's message: it offers to load the file unsafely (weights_only=False), which a model.pt never needs
        raise UserError(f"{path}: not a spp-det model.pt ({type(exc).__name__} reading it as one: damaged, or "
                        "another program's file); `spp-det train` writes work_dir/model.pt") from None
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise UserError(f"{path}: not a spp-det model artifact (a stage checkpoint or another program's file?); "
                        f"expected work_dir/{ARTIFACT} written by `spp-det train`")
    if artifact.get("version") != VERSION:
        raise UserError(f"{path}: model format version {artifact.get('version')!r}; this spp-det reads version "
                        f"{VERSION}: retrain or use the spp-det version that wrote it")
    missing = [k for k in ("classes", "config", "state_dict", "svm") if k not in artifact]
    if missing:
        raise UserError(f"{path}: damaged model artifact: missing {', '.join(missing)}")
    return artifact


def check_classes(artifact: dict, cfg: DictConfig, path: str | Path) -> None:
    """Refuse a model trained on other classes than ``data.classes`` (eval on a dataset)."""
    have, want = list(artifact["classes"]), list(cfg.data.classes)
    if have != want:
        raise UserError(f"{path}: model was trained for classes {have}, but data.classes is {want}; "
                        "use the matching data config or another model")
