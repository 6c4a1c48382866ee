"""Pascal VOC average precision, exactly as the official devkit (``VOCevaldet.m``, ``VOCap.m``).

Rules (docs/evaluation.md), per class:

- detections of every image are sorted by score, descending (a stable sort, as MATLAB's
  ``sort``: equal scores keep the order in which they were given);
- each detection is matched to the ground-truth box of its image with the highest IoU, difficult
  boxes included in that search;
- **IoU >= 0.5** is a hit. We use the MATLAB devkit's ``ovmax >= VOCopts.minoverlap``, not
  py-faster-rcnn's ``ovmax > ovthresh``: a detection at IoU exactly 0.5 is a true positive;
- a hit on a difficult box is ignored (neither true nor false positive); a hit on a box already
  matched by a higher-scoring detection is a false positive (a duplicate); otherwise a true
  positive, and the box is marked as matched; no hit is a false positive;
- difficult boxes do not count as positives (``npos``).

AP: VOC2007's 11-point interpolation (``VOCopts.ap07``: mean over t = 0, 0.1, ..., 1 of the
maximal precision at recall >= t, with t the values of MATLAB's ``0:0.1:1``, which are not all
``k / 10``) and VOC2010+'s area under the monotone precision envelope (``VOCap.m``).

Boxes are in the internal convention (0-based continuous), where the plain IoU equals the
devkit's inclusive "+1" IoU (``spp_det.boxes``), so no pixel arithmetic appears here.

A class with ground truth but no detections has AP 0. A class without (non-difficult) ground
truth in the split has no AP (``None``): the devkit would divide by zero; it is left out of the mean.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spp_det.boxes import box_iou
from spp_det.structures import Detections

# IoU at which a detection hits a ground-truth box (VOCopts.minoverlap).
MIN_OVERLAP = 0.5


def _matlab_colon(a: float, step: float, b: float) -> np.ndarray:
    """MATLAB's ``a:step:b`` to the last bit: the first half is ``a + k*step``, the second half
    ``b - (n-k)*step`` (MathWorks' colon algorithm). numpy's ``arange`` differs at 0.6 and 0.7,
    which changes the 11-point AP whenever the recall is exactly 6/10 or 7/10 of ``npos``."""
    n = int(np.floor((b - a) / step + 1e-10))
    k = np.arange(n + 1)
    out = np.where(k < n / 2, a + k * step, b - (n - k) * step)
    if n % 2 == 0:
        out[n // 2] = (a + b) / 2
    return out


VOC07_THRESHOLDS = _matlab_colon(0.0, 0.1, 1.0)  # recall thresholds of the 11-point AP


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point interpolated AP (VOC2007): ``mean_t max(precision[recall >= t])`` (0 if none)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    ap = 0.0
    for t in VOC07_THRESHOLDS:
        above = precision[recall >= t]
        ap += (above.max() if above.size else 0.0) / 11.0
    return float(ap)


def voc10_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone (non-increasing) precision envelope (VOC2010+, ``VOCap.m``)."""
    mrec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: max precision at any higher recall
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1  # where recall changes
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


@dataclasses.dataclass
class ClassResult:
    """One class's evaluation: ``recall``/``precision`` ``float64 [D]`` along the detections
    sorted by score; ``tp``/``fp`` ``bool [D]`` (an ignored detection is neither); ``order``
    ``int [D]`` the sorted position -> index of the detection as given; ``gt_index`` ``int [D]``
    the ground-truth box of highest IoU (index among its image's boxes of this class) when that
    IoU reaches ``min_overlap`` (a hit, a duplicate or a difficult box), else -1; ``iou``
    ``float64 [D]`` the highest IoU with a box of this class in the image (0 when it has none)."""

    npos: int
    num_difficult: int
    num_det: int
    recall: np.ndarray
    precision: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    ap07: float | None
    ap10: float | None
    order: np.ndarray
    gt_index: np.ndarray
    iou: np.ndarray


def evaluate_class(
    det_image: np.ndarray,
    det_scores: np.ndarray,
    det_boxes: np.ndarray,
    gt_boxes: list[np.ndarray],
    gt_difficult: list[np.ndarray],
    min_overlap: float = MIN_OVERLAP,
) -> ClassResult:
    """VOCevaldet for one class.

    ``det_image`` ``int [D]`` indexes the image of each detection in ``gt_boxes``;
    ``det_scores`` ``[D]``; ``det_boxes`` ``[D, 4]``; ``gt_boxes[i]`` ``[G_i, 4]`` and
    ``gt_difficult[i]`` ``bool [G_i]``: this class's ground truth in image ``i``.
    """
    det_image = np.asarray(det_image, np.int64).reshape(-1)
    det_scores = np.asarray(det_scores, np.float64).reshape(-1)
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    npos = int(sum(int((~d).sum()) for d in gt_difficult))
    num_difficult = int(sum(int(d.sum()) for d in gt_difficult))
    order = np.argsort(-det_scores, kind="stable")  # MATLAB sort(-confidence) is stable
    matched = [np.zeros(len(b), bool) for b in gt_boxes]
    nd = len(order)
    tp, fp = np.zeros(nd, bool), np.zeros(nd, bool)
    gt_index, best_iou = np.full(nd, -1, np.int64), np.zeros(nd)
    for d, j in enumerate(order):
        i = det_image[j]
        gt = gt_boxes[i]
        if len(gt) == 0:
            fp[d] = True
            continue
        overlaps = box_iou(det_boxes[j : j + 1], gt)[0]  # [G_i]
        jmax = int(np.argmax(overlaps))  # first maximum, as the devkit's strict `ov > ovmax`
        best_iou[d] = overlaps[jmax]
        if overlaps[jmax] >= min_overlap:
            gt_index[d] = jmax  # devkit: ovmax >= minoverlap (IoU exactly 0.5 is a hit)
            if gt_difficult[i][jmax]:
                continue  # a hit on a difficult box is neither a hit nor a miss
            if matched[i][jmax]:
                fp[d] = True  # duplicate detection of an already matched box
            else:
                tp[d] = True
                matched[i][jmax] = True
        else:
            fp[d] = True
    ctp, cfp = np.cumsum(tp).astype(np.float64), np.cumsum(fp).astype(np.float64)
    if npos == 0:
        recall = np.full(nd, np.nan)
        ap07 = ap10 = None
    else:
        recall = ctp / npos
    # The devkit's tp/(tp+fp) is NaN while only ignored detections have been seen (recall 0
    # there); MATLAB's max() skips NaN, which is the same as precision 0 at recall 0.
    precision = np.where(ctp + cfp > 0, ctp / np.maximum(ctp + cfp, 1), 0.0)
    if npos:
        ap07, ap10 = voc07_ap(recall, precision), voc10_ap(recall, precision)
    return ClassResult(npos, num_difficult, nd, recall, precision, tp, fp, ap07, ap10, order, gt_index, best_iou)


def mean_ap(aps: dict[str, float | None]) -> float | None:
    """Mean over the classes that have an AP (classes without ground truth are absent)."""
    values = [v for v in aps.values() if v is not None]
    return float(np.mean(values)) if values else None


class VOCEvaluator:
    """detectron2-style evaluator: ``reset()``, ``process(image_id, detections)`` per image,
    ``evaluate() -> dict``.

    ``records``: the split's ``ImageRecord``s (ground truth in the internal convention);
    ``classes``: the names of labels 1..K.
    """

    def __init__(self, records, classes, min_overlap: float = MIN_OVERLAP):
        self.records = list(records)
        self.classes = list(classes)
        self.min_overlap = min_overlap
        self._index = {r.image_id: i for i, r in enumerate(self.records)}
        if len(self._index) != len(self.records):
            raise ValueError("VOCEvaluator: duplicate image ids in records (flipped records are not evaluated)")
        self.reset()

    def reset(self) -> None:
        self._detections: list[tuple[int, Detections]] = []

    def process(self, image_id: str, detections: Detections) -> None:
        """Add one image's detections (labels 1..K, boxes internal convention)."""
        if image_id not in self._index:
            raise KeyError(f"image id {image_id!r} is not in the evaluated split")
        labels = detections.labels
        if len(labels) and (labels.min() < 1 or labels.max() > len(self.classes)):
            raise ValueError(f"{image_id}: detection labels must be in 1..{len(self.classes)}, got {sorted(set(labels.tolist()))}")
        self._detections.append((self._index[image_id], detections))

    def class_detections(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every detection of class ``k`` (1..K) in the order processed: record index ``int [D]``,
        index among that image's detections ``int [D]``, scores ``[D]``, boxes ``[D, 4]``."""
        image_idx, det_idx, scores, boxes = [], [], [], []
        for i, dets in self._detections:
            where = np.nonzero(dets.labels == k)[0]
            image_idx.append(np.full(len(where), i))
            det_idx.append(where)
            scores.append(dets.scores[where])
            boxes.append(dets.boxes[where])
        if not image_idx:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4))
        return np.concatenate(image_idx), np.concatenate(det_idx), np.concatenate(scores), np.concatenate(boxes)

    def class_results(self) -> dict[str, ClassResult]:
        out = {}
        for k, name in enumerate(self.classes, start=1):
            gt_boxes = [r.boxes[r.labels == k] for r in self.records]
            gt_difficult = [r.difficult[r.labels == k] for r in self.records]
            image_idx, _, scores, boxes = self.class_detections(k)
            out[name] = evaluate_class(image_idx, scores, boxes, gt_boxes, gt_difficult, self.min_overlap)
        return out

    def evaluate(self) -> dict:
        """``{"map_voc07", "map_voc10": float | None, "ap_voc07", "ap_voc10": {class: float | None},
        "num_gt": {class: int} (non-difficult), "num_difficult", "num_det": {class: int},
        "pr_curves": {class: {"recall": [...], "precision": [...]}}}``."""
        results = self.class_results()
        ap07 = {c: r.ap07 for c, r in results.items()}
        ap10 = {c: r.ap10 for c, r in results.items()}
        return {
            "map_voc07": mean_ap(ap07),
            "map_voc10": mean_ap(ap10),
            "ap_voc07": ap07,
            "ap_voc10": ap10,
            "num_gt": {c: r.npos for c, r in results.items()},
            "num_difficult": {c: r.num_difficult for c, r in results.items()},
            "num_det": {c: r.num_det for c, r in results.items()},
            "pr_curves": {c: {"recall": r.recall.tolist(), "precision": r.precision.tolist()}
                          for c, r in results.items()},
        }
