"""Where the errors are: Hoiem et al.'s false-positive types, a confusion matrix, and per-image outcomes.

Hoiem, Chodpathumwan, Dai, "Diagnosing Error in Object Detectors" (ECCV 2012), Sec. 2, as R-CNN
(Fig. 5) and SPP-net use it. Every detection of class ``c`` is, in this order of precedence:

- **correct**: a true positive of the VOC evaluation (IoU >= 0.5, ``voc_ap``'s devkit rules);
- **localisation**: otherwise IoU >= 0.1 with a ground-truth box of class ``c`` (this includes
  duplicate detections of an object already found);
- **similar**: otherwise IoU >= 0.1 with an object of a class similar to ``c`` (same group in
  ``similar``; Hoiem's VOC groups are animals, vehicles, furniture);
- **other**: otherwise IoU >= 0.1 with an object of any other class;
- **background**: everything else.

Detections the devkit ignores (hits on difficult boxes) are left out. "Top-ranked" follows
Hoiem et al.: the ``N`` highest-scored detections of a class, ``N`` the number of its
(non-difficult) objects in the split, so a perfect detector's top ``N`` are all correct. The same
detections make the confusion matrix and the per-image outcomes (the report's operating point,
independent of the scale of the scores).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spp_det.boxes import box_iou
from spp_det.structures import Detections
from spp_det.evaluation.voc_ap import MIN_OVERLAP, VOCEvaluator

ERROR_TYPES = ("correct", "localisation", "similar", "other", "background")
MIN_ERROR_IOU = 0.1  # Hoiem et al. 2012, Sec. 2: below this overlap a detection is on background

# Hoiem et al.'s similar-class groups for Pascal VOC (their Sec. 2; R-CNN Fig. 5 plots these three).
VOC_SIMILAR = (
    ("bird", "cat", "cow", "dog", "horse", "sheep"),
    ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"),
    ("chair", "diningtable", "sofa"),
)


@dataclasses.dataclass
class Outcome:
    """One drawn item of an image: ``kind`` is ``tp``, ``fp`` or ``miss``; ``error`` the
    Hoiem type of a detection (None for a miss); ``score`` None for a miss."""

    box: np.ndarray
    label: int
    kind: str
    score: float | None = None
    error: str | None = None


@dataclasses.dataclass
class ImageOutcome:
    """Top-ranked detections of one image: counts and the items to draw."""

    index: int
    tp: int = 0
    fp: int = 0
    missed: int = 0
    items: list[Outcome] = dataclasses.field(default_factory=list)

    @property
    def score(self) -> float | None:
        """``tp / (tp + fp + missed)``: 1 when every object is found and nothing else; None for an
        image without objects or top-ranked detections."""
        total = self.tp + self.fp + self.missed
        return self.tp / total if total else None


@dataclasses.dataclass
class Analysis:
    """``errors[class][type]``: counts among the class's top-ranked detections (``ERROR_TYPES``);
    ``confusion`` ``int [K + 1, K + 1]``: rows the true class (last row: background, i.e. no
    object), columns the predicted class (last column: missed); each non-difficult object is
    counted once in its row, each top-ranked detection once in its column. ``images``: one per
    record; there an object not found by its own class counts as missed."""

    classes: list[str]
    errors: dict[str, dict[str, int]]
    confusion: np.ndarray
    images: list[ImageOutcome]


def similar_groups(classes, groups=None) -> dict[str, set[str]]:
    """Class -> the other classes of its group. ``groups``: lists of class names; None gives
    Hoiem's VOC groups (a dataset without VOC names then has no similar classes)."""
    out: dict[str, set[str]] = {c: set() for c in classes}
    for group in VOC_SIMILAR if groups is None else groups:
        members = [c for c in group if c in out]
        for c in members:
            out[c] |= set(members) - {c}
    return out


def _error_type(record, box, label: int, iou_same: float, similar: set[int]) -> str:
    """Hoiem type of a false positive of class ``label`` at ``box`` in ``record``."""
    if iou_same >= MIN_ERROR_IOU:
        return "localisation"
    others = record.labels != label
    if not others.any():
        return "background"
    overlaps = box_iou(box[None], record.boxes[others])[0]
    other_labels = record.labels[others]
    near = overlaps >= MIN_ERROR_IOU
    if any(int(lab) in similar for lab in other_labels[near]):
        return "similar"
    return "other" if near.any() else "background"


def confusion_matrix(records, classes: list[str], errors: dict, matched: list[np.ndarray], false_positives: list,
                     images: list[ImageOutcome]) -> np.ndarray:
    """``int64 [K + 1, K + 1]``: rows true class (last: background), columns predicted class (last:
    missed), from the top-ranked detections' outcomes (``analyse``); adds every object not found as
    its own class to ``images``' misses."""
    k_all = len(classes)
    confusion = np.zeros((k_all + 1, k_all + 1), np.int64)
    for k in range(1, k_all + 1):  # true positives: the diagonal
        confusion[k - 1, k - 1] = errors[classes[k - 1]]["correct"]
    # A false positive at IoU >= 0.5 on an object of another class that its own class's detections
    # did not find counts as that class confused with the predicted one (each object once, highest
    # score first); any other false positive as background (the last row).
    used = [m.copy() for m in matched]
    for score, i, box, k in sorted(false_positives, key=lambda t: -t[0]):
        r = records[i]
        free = np.nonzero(~used[i] & ~r.difficult & (r.labels != k))[0]
        if len(free):
            overlaps = box_iou(box[None], r.boxes[free])[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= MIN_OVERLAP:
                used[i][free[best]] = True
                confusion[int(r.labels[free[best]]) - 1, k - 1] += 1
                continue
        confusion[k_all, k - 1] += 1
    for i, r in enumerate(records):
        for g in np.nonzero(~used[i] & ~r.difficult)[0]:
            confusion[int(r.labels[g]) - 1, k_all] += 1  # an object no top-ranked detection found
        for g in np.nonzero(~matched[i] & ~r.difficult)[0]:  # not found as its own class
            images[i].missed += 1
            images[i].items.append(Outcome(np.asarray(r.boxes[g], np.float64), int(r.labels[g]), "miss"))
    return confusion


def analyse(records, classes, detections: dict[str, Detections], similar=None) -> Analysis:
    """Hoiem error types, confusion matrix and per-image outcomes of ``detections`` (image id ->
    ``Detections``) on ``records``, at the top-ranked detections of each class (module docstring).
    ``similar``: groups of similar class names (None: Hoiem's VOC groups)."""
    classes = list(classes)
    groups = similar_groups(classes, similar)
    evaluator = VOCEvaluator(records, classes)
    for r in records:
        evaluator.process(r.image_id, detections.get(r.image_id, Detections.empty()))
    results = evaluator.class_results()
    images = [ImageOutcome(i) for i in range(len(records))]
    matched = [np.zeros(len(r.boxes), bool) for r in records]  # objects found by a top-ranked detection
    false_positives = []  # (score, record index, box, label) of top-ranked false positives
    errors = {}
    for k, name in enumerate(classes, start=1):
        res = results[name]
        image_idx, _, scores, boxes = evaluator.class_detections(k)
        similar_labels = {classes.index(c) + 1 for c in groups[name]}
        counts = dict.fromkeys(ERROR_TYPES, 0)
        taken = 0
        for d, j in enumerate(res.order):
            if taken >= res.npos:
                break
            if not (res.tp[d] or res.fp[d]):
                continue  # a hit on a difficult box: ignored, as in the AP
            taken += 1
            i = int(image_idx[j])
            r, box, score = records[i], np.asarray(boxes[j], np.float64), float(scores[j])
            if res.tp[d]:
                counts["correct"] += 1
                matched[i][np.nonzero(r.labels == k)[0][res.gt_index[d]]] = True
                images[i].tp += 1
                images[i].items.append(Outcome(box, k, "tp", score, "correct"))
            else:
                error = _error_type(r, box, k, float(res.iou[d]), similar_labels)
                counts[error] += 1
                images[i].fp += 1
                images[i].items.append(Outcome(box, k, "fp", score, error))
                false_positives.append((score, i, box, k))
        errors[name] = counts

    confusion = confusion_matrix(records, classes, errors, matched, false_positives, images)
    return Analysis(classes, errors, confusion, images)


def best_and_worst(images: list[ImageOutcome], n: int) -> tuple[list[ImageOutcome], list[ImageOutcome]]:
    """The ``n`` images with the highest outcome score (most objects first on ties) and the ``n``
    with the lowest (most errors first on ties), never the same image in both."""
    scored = [im for im in images if im.score is not None]
    best = sorted(scored, key=lambda im: (-im.score, -im.tp, im.index))[:n]
    chosen = {im.index for im in best}
    rest = [im for im in scored if im.index not in chosen]
    worst = sorted(rest, key=lambda im: (im.score, -(im.fp + im.missed), im.index))[:n]
    return best, worst
