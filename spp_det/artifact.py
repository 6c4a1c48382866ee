"""Stage artifacts: every file name spp-det writes in ``work_dir`` and ``cache_dir``, where each lies,
and the format of the model artifact ``work_dir/model.pt`` that detection loads.

The one place these names are written (docs/ARCHITECTURE.md: below the model, imported by every
layer above). The model artifact is assembled by ``spp_det.stages.assemble`` from the stage
artifacts and loads with ``torch.load(..., weights_only=True)`` (only tensors, numbers, strings,
lists and dicts: never arbitrary pickles). Layout (format ``FORMAT``, version ``VERSION``)::

    {"format": "spp-det-model", "version": 1,
     "classes": [K names], "config": the model config group as a dict (weights=None),
     "scales": [shorter sides], "meta": checkpoint_meta, "backbone_source": where the conv weights came from,
     "state_dict": SPPNet state_dict (backbone + fc6/fc7), "fc8": {"weight" [K+1, D], "bias" [K+1]},
     "svm": {"weight" [K, D], "bias" [K], "feature_scale": float},
     "bboxreg": {"weight" [K, D_pool5 + 1, 4], "feature_scale": float} or None}
"""
from __future__ import annotations

from pathlib import Path

from spp_det import io
from spp_det.errors import UserError

# files in work_dir, in the order `spp-det train` writes them
PRETRAIN_CROPS = "pretrain_crops.pt"        # pretrain.source=crops+windows: the crop phase, where windows start
PRETRAIN_CROPS_STATE = "pretrain_crops_state.pt"
PRETRAIN = "pretrain.pt"                    # spp-det pretrain: backbone (+ fc6/fc7, classifier)
PRETRAIN_STATE = "pretrain_state.pt"        # resumable checkpoints (spp_det.training.loop), removed when done
FINETUNE = "finetune.pt"
FINETUNE_STATE = "finetune_state.pt"
SVM = "svm.pt"
BBOXREG = "bboxreg.pt"
MODEL = "model.pt"                          # everything detection needs, in one file (below)
TRAIN_SUMMARY = "train_summary.json"
RUN_LOCK = ".spp-det.lock"                  # held by the run writing work_dir (spp_det.io.lock_folder): one at a time

# content-keyed caches in cache_dir (one folder each)
PROPOSALS_CACHE = "proposals"
CONV5_CACHE = "conv5"
FINETUNE_POOL5_CACHE = "finetune_pool5"

FORMAT = "spp-det-model"
VERSION = 1


def work_file(cfg, name: str) -> Path:
    """``work_dir/<name>``: where a stage artifact of this config lies."""
    return Path(cfg.work_dir) / name


def cache_folder(cache_dir: str | Path, name: str) -> Path:
    """``cache_dir/<name>``: one content-keyed cache."""
    return Path(cache_dir) / name


# keys of the model group that model.pt files of earlier versions hold: moved to eval (spp_det.config.MOVED_KEYS;
# the detector still honours test_scales / test_max_size of such a file) or left out
LEGACY_MODEL_KEYS = ("checkpoint", "test_scales", "test_max_size", "rcnn_context", "rcnn_input")


def model_config(artifact: dict) -> dict:
    """The artifact's model group as the ``model`` config of this version reads it (legacy keys left out)."""
    return {k: v for k, v in dict(artifact["config"]).items() if k not in LEGACY_MODEL_KEYS}


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
                        f"expected work_dir/{MODEL} written by `spp-det train`")
    if artifact.get("version") != VERSION:
        raise UserError(f"{path}: model format version {artifact.get('version')!r}; this spp-det reads version "
                        f"{VERSION}: retrain or use the spp-det version that wrote it")
    missing = [k for k in ("classes", "config", "state_dict", "svm") if k not in artifact]
    if missing:
        raise UserError(f"{path}: damaged model artifact: missing {', '.join(missing)}")
    return artifact


# `spp-det export export.output=DIR`: the detector as two ONNX graphs and what runs between them
EXPORT_FORMAT = "spp-det-onnx"
EXPORT_VERSION = 1
EXPORT_MANIFEST = "spp_det_onnx.json"   # classes, scales, projection, pyramid, thresholds (spp_det/stages/export.py)
EXPORT_CONV5 = "conv5.onnx"             # normalised image [1, 3, h, w] -> conv5 [1, C, h', w']
EXPORT_HEAD = "head.onnx"               # pool5 [N, D] -> svm_scores [N, K] (+ softmax_scores, box_deltas [N, K, 4])


def load_export(folder: str | Path) -> dict:
    """The manifest of an exported detector folder, with a clear ``UserError`` when the folder, its
    manifest or a graph it names is missing, or the manifest is not one this version reads."""
    import json

    folder = Path(folder)
    manifest_path = folder / EXPORT_MANIFEST
    if not manifest_path.is_file():
        what = "a model file, not an exported folder" if folder.is_file() else "no exported detector there"
        raise UserError(f"{folder}: {what} (no {EXPORT_MANIFEST}); `spp-det export export.checkpoint=MODEL.pt "
                        "export.output=DIR` writes one")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest_path}: not valid JSON ({exc}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UserError(f"{manifest_path}: not a spp-det export manifest (format {EXPORT_FORMAT!r} expected)")
    if manifest.get("version") != EXPORT_VERSION:
        raise UserError(f"{manifest_path}: export version {manifest.get('version')!r}; this spp-det reads version "
                        f"{EXPORT_VERSION}: export the model again")
    missing = [name for name in manifest["graphs"].values() if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: graph file(s) {', '.join(missing)} named by {EXPORT_MANIFEST} are missing")
    return manifest
