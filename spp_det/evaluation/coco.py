"""COCO-style numbers (pycocotools) on the same detections as the VOC evaluation.

The ground truth is converted to COCO format in memory: boxes ``x1, y1, x2, y2`` (internal,
0-based continuous, which is COCO's pixel convention too) become ``[x, y, w, h]`` with
``area = w * h``; difficult boxes become ``iscrowd = 1`` regions, pycocotools' only way to ignore
a box (its ``_prepare`` overwrites any ``ignore`` flag with ``iscrowd``). A detection matching a
crowd region is neither a hit nor a miss, as a difficult hit in VOC; note that pycocotools
measures overlap with a crowd region as intersection over the detection's area.
"""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np

from spp_det.structures import Detections

log = logging.getLogger(__name__)

# Names of COCOeval.stats[0:6] (bbox), in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth(records, classes) -> dict:
    """COCO dataset dict of the split: images ``id`` 1..N in records' order, categories 1..K."""
    images, annotations = [], []
    for i, r in enumerate(records, start=1):
        images.append({"id": i, "file_name": str(r.image_id), "width": int(r.width), "height": int(r.height)})
        for box, label, difficult in zip(r.boxes, r.labels, r.difficult):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(bool(difficult)),
            })
    categories = [{"id": k, "name": name} for k, name in enumerate(classes, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_metrics(records, classes, detections: dict[str, Detections]) -> dict[str, float]:
    """``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` (fractions in [0, 1]; None where no ground
    truth falls in a size range, pycocotools' -1). ``detections``: image id -> ``Detections``."""
    return coco_evaluate(records, classes, detections)[0]


def coco_evaluate(records, classes, detections: dict[str, Detections]) -> tuple[dict, dict]:
    """``coco_metrics`` and, per class, ``{"AP", "AP50", "AP75"}`` (all object sizes, 100
    detections per image; None for a class without ground truth), from one pycocotools run."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = {r.image_id: i for i, r in enumerate(records, start=1)}
    results = []
    for image_id, dets in detections.items():
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": index[image_id], "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    if not results:  # loadRes cannot take an empty list; no detections score 0 everywhere
        has_gt = {k for r in records for k in r.labels[~r.difficult].tolist()}
        return ({name: 0.0 for name in COCO_METRICS},
                {c: dict.fromkeys(COCO_PER_CLASS, 0.0) if k in has_gt else None
                 for k, c in enumerate(classes, start=1)})
    captured = io.StringIO()  # pycocotools prints its progress and table; keep it for the debug log
    with contextlib.redirect_stdout(captured):
        gt = COCO()
        gt.dataset = coco_ground_truth(records, classes)
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools:\n%s", captured.getvalue())
    # pycocotools' -1 ("no ground truth of that size", e.g. APs of a set without small objects) is
    # not a score: None (null in metrics.json, "n/a" in the summary)
    overall = {name: float(v) if v >= 0 else None for name, v in zip(COCO_METRICS, np.asarray(evaluator.stats[:6]))}
    # eval["precision"]: [IoU thresholds 0.5:0.05:0.95, 101 recall points, K, area ranges, maxDets];
    # -1 marks "no ground truth", as in summarize(). Area range 0 is "all", maxDets -1 is 100.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k]
        per_class[name] = None if not (p > -1).any() else {
            "AP": float(p[p > -1].mean()),
            "AP50": float(_mean_valid(p[0])),  # IoU 0.5
            "AP75": float(_mean_valid(p[5])),  # IoU 0.75
        }
    return overall, per_class


COCO_PER_CLASS = ("AP", "AP50", "AP75")


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else 0.0
