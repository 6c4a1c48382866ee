"""The stages: one module each (``run(cfg)``), and ``STAGES``, the one list that declares them.

A new stage is a module here and one entry in ``STAGES`` (``spp_det.stages.declare.Stage``); the
CLI's checks and ``--help``, ``spp-det train``'s order and the stage tables of docs/ARCHITECTURE.md
all come from the entries. The order is the pipeline's.
"""
from __future__ import annotations

from spp_det.artifact import BBOXREG, CONV5_CACHE, FINETUNE, MODEL, PRETRAIN, PROPOSALS_CACHE, SVM
from spp_det.stages.declare import NOT_TRAINING_DATA, TRAINING_DATA, TRAINING_SPLITS, Folder, Key, Stage, head_key

# what a user sets most often in a training stage; what the stages that train a head declare besides
_TRAINING = ("experiment", "name", "data.root", "data.classes", "device")
_HEAD = dict(common=_TRAINING, splits=TRAINING_SPLITS, split_check=True, lock=True, caches=True, in_train=True)
# the data keys pretraining reads (on its own splits when pretrain.train_split / val_split are set)
_PRETRAIN_DATA = tuple(f"data.{k}" for k in ("root", "year", "train_split", "val_split", "val_fraction", "classes",
                                             "use_difficult", "max_images"))
# settings only pretrain.source=windows reads: a change to them keeps crops+windows' crop phase current
WINDOW_KEYS = ("windows_per_image", "fg_fraction", "fg_iou", "iterations", "iteration_lr_steps", "log_every",
               "start_from", "window_proposals", "frozen_convs")

STAGES: tuple[Stage, ...] = (
    Stage("synth", "write the synthetic VOC-layout dataset (data.root=DIR)", groups=("synth", "data"), common=(
        "data.root", "synth.num_images", "synth.pretrain_images", "synth.classes", "synth.overwrite", "experiment"),
          writes=(Folder("data.root", "the synthetic dataset (data.root)", own=False),)),
    Stage("proposals", "compute and cache selective-search boxes for a split", groups=("proposals", "data"),
          common=("data.root", "proposals", "proposals.max_boxes", "num_workers", "experiment"),
          splits=("train", "val", "test"), caches=True, in_train=True, writes=(Folder("proposals.export", "proposals.export",
                                                                                      own=False, parent=True),),
          # a content-keyed cache (image bytes, the box-changing settings: declare.proposals_cache);
          # proposals.export and proposals.split only say what to fill and where to copy the boxes
          keys=(Key("proposals", f"cache_dir/{PROPOSALS_CACHE}/", reads=("proposals", "data"),
                    paper="Sec. 4.1 selective search, fast mode (~2,000 windows per image)"),)),
    Stage("pretrain", "train backbone + pyramid + fc as a classifier (multi-size)",
          groups=("pretrain", "model", "data", "proposals"), common=_TRAINING, lock=True, caches=True, in_train=True,
          keys=(Key("pretrain_crops", PRETRAIN, reads=("pretrain", "model", *_PRETRAIN_DATA, "seed"),
                    # crops never pool windows the way detection does: its scales and projection do not matter
                    ignores=(*(f"pretrain.{k}" for k in WINDOW_KEYS), "model.backbone_checkpoint", "model.scales",
                             "model.max_size", "model.best_scale_area", "model.projection"),
                    paper="Sec. 2.3 / 3.1 classification pretraining, multi-size"),
                Key("pretrain_windows", PRETRAIN, reads=("pretrain", "model", *_PRETRAIN_DATA, "seed"),
                    consumes=("start_from", "proposals"),  # pretrain.start_from's weights, not its name
                    ignores=("model.backbone_checkpoint", "pretrain.start_from"),
                    paper="not the paper: windows pooled as detection pools them (configs/pretrain)"))),
    Stage("features", "compute and cache conv5 feature maps per image and scale", groups=("model", "data"),
          common=_TRAINING, splits=TRAINING_SPLITS, split_check=True, caches=True, in_train=True,
          # a content-keyed cache (weights, image bytes, scales): always runs, repeats are cache hits
          keys=(Key("features", f"cache_dir/{CONV5_CACHE}/", reads=("model", *TRAINING_DATA), consumes=("backbone",),
                    ignores=NOT_TRAINING_DATA, paper="Sec. 4.1 conv5 once per image and scale"),)),
    Stage("finetune", "fine-tune fc6, fc7 and a new fc8 on pooled pyramid vectors",
          groups=("finetune", "model", "data", "proposals"), common=_TRAINING, splits=TRAINING_SPLITS,
          split_check=True, lock=True, caches=True, in_train=True,
          keys=(Key("finetune", FINETUNE, reads=("finetune", "model", *TRAINING_DATA, "seed"),
                    consumes=("backbone", "proposals"), ignores=("model.backbone_checkpoint", *NOT_TRAINING_DATA),
                    paper="Sec. 3.1.2 / 4.1 fine-tuning"),)),
    Stage("svm", "train per-class linear SVMs with hard-negative mining", groups=("svm", "model", "data", "proposals"),
          keys=(head_key("svm", SVM, "Sec. 4.1 SVMs (R-CNN hard-negative mining)"),), **_HEAD),
    Stage("bboxreg", "train per-class box regressors on pool5 features", groups=("bboxreg", "model", "data", "proposals"),
          keys=(head_key("bboxreg", BBOXREG, "R-CNN appendix C (box regression)"),), **_HEAD),
    Stage("train", "run every training stage in order, skipping current ones",
          groups=("data", "model", "proposals", "pretrain", "finetune", "svm", "bboxreg"),
          common=("experiment", "name", "data.root", "data.classes", "data.train_split", "data.val_split", "model",
                  "device", "seed"),
          splits=TRAINING_SPLITS, split_check=True, lock=True, caches=True,
          keys=(Key("model", MODEL, reads=("model", "data.classes"), consumes=("finetune", "svm", "bboxreg"),
                    paper="the detector of Sec. 4.1 (fc7 -> SVM scores, box regression)"),)),
    Stage("eval", "detect on a test split and compute VOC / COCO mAP", module="spp_det.stages.evaluate",
          groups=("eval", "data", "proposals"),
          common=("name", "eval.checkpoint", "data.root", "data.test_split", "eval.results_dir", "eval.score_thresh",
                  "experiment", "device"),
          splits=("test",), split_check=True, caches=True, needs_model=True,
          # writes into its run directory; reads the test split only (no training stage reads eval.* or data.test_split)
          keys=(Key("eval", "run dir: metrics.json, comp4 result files, report.html", reads=("eval", "data", "proposals"),
                    consumes=("model",), paper="Sec. 4.1 test: scores, NMS 0.3; VOC devkit AP"),)),
    Stage("detect", "detect objects in a folder of images", groups=("detect", "eval", "proposals"),
          common=("detect.source", "detect.output", "name", "detect.checkpoint", "detect.score_thresh",
                  "detect.classes", "detect.format", "detect.runtime", "device"),
          caches=True, needs_model=True, writes=(Folder("detect.output", "the detections (detect.output)"),),
          keys=(Key("detect", "detect.output: detections.jsonl (+ COCO / VOC / Label Studio / YOLO files), annotated "
                    "images", reads=("detect", "proposals"), consumes=("model",),
                    paper="Sec. 4.1 test procedure on any folder of images"),)),
    Stage("export", "write a trained model.pt as ONNX graphs for onnxruntime (export.output=DIR)",
          groups=("export", "detect", "eval"), common=("export.checkpoint", "export.output", "name", "export.verify"),
          needs_model=True, keys=(Key("export", "export.output: conv5.onnx, head.onnx, spp_det_onnx.json",
                                      reads=("export", "detect"), consumes=("model",),
                                      paper="Sec. 4.1 test procedure, as two ONNX graphs and the pooling between them"),)),
    Stage("report", "rebuild report.html of an eval run: spp-det report RUN_DIR (no model)", plain=True),
    Stage("bench", "time SPP-net against R-CNN mode, seconds per image by step", groups=(
        "bench", "model", "proposals", "eval"), common=("bench.num_images", "bench.precisions", "experiment", "model", "device")),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The declaration of the stage called ``name``."""
    return BY_NAME[name]
