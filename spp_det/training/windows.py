"""The windows of one training image, per stage that trains on them, and their features.

Every set starts from the same candidates: the image's ground-truth boxes (R-CNN trains on them as
windows too) followed by its selective-search proposals (``record_proposals``: mirrored with a
flipped record). The stages differ in what they keep and how they label it:

* ``finetune_windows``: foreground (IoU >= ``fg_iou``, its box's class) and a bounded sample of
  background (IoU in ``bg_iou``) for fine-tuning's softmax (paper, Sec. 3.1.2);
* ``svm_windows``: every window with its per-class overlaps: positives are the ground-truth boxes,
  negatives windows below ``svm.neg_iou`` to every box of the class (R-CNN's hard-negative mining);
* ``bboxreg_windows``: windows with IoU > ``min_iou`` to a box and that box as the target (R-CNN's
  box regression, appendix C).
"""
from __future__ import annotations

import numpy as np
import torch

from spp_det.boxes import box_iou
from spp_det.data.voc import load_split
from spp_det.proposals import load_proposals
from spp_det.training.sampling import fg_bg_indices, label_windows, subsample, trained_objects


def training_records(rs, flip: bool):
    """Records of ``data.train_split`` (plus mirrors when ``flip``) and their proposals (``rs``: a ``RunSettings``)."""
    records = load_split(rs.data, rs.data.train_split)
    proposals = load_proposals(records, rs.proposals, rs.cache_dir, workers=int(rs.num_workers), progress=True)
    if flip:
        records = records + [r.flip() for r in records]
    return records, proposals


def finetune_windows(record, proposals: np.ndarray, fcfg, use_difficult: bool, rng: np.random.Generator):
    """Training windows of one image record: ``(windows float32 [W, 4], labels int64 [W], n_fg)``.

    Candidates are the ground-truth boxes (counted as foreground, as in R-CNN / Fast R-CNN) and
    the proposals; foreground is IoU >= ``fg_iou`` (label = that box's class), background IoU in
    ``[bg_iou[0], bg_iou[1])``; at most ``max_bg_per_image`` background windows are kept. Difficult
    objects (when not trained on) are neither targets nor background: windows covering one by
    >= ``fg_iou`` are left out.
    """
    used = trained_objects(record, use_difficult)
    gt, gt_labels = record.boxes[used], record.labels[used]
    candidates = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)])
    labelled = label_windows(candidates, gt, gt_labels, float(fcfg.fg_iou), ignore_boxes=record.boxes[~used])
    fg, bg = fg_bg_indices(labelled, float(fcfg.fg_iou), tuple(float(v) for v in fcfg.bg_iou))
    bg = subsample(bg, fcfg.max_bg_per_image, rng)
    keep = np.concatenate([fg, bg])
    return candidates[keep], labelled.labels[keep], len(fg)


def svm_windows(record, proposals: np.ndarray, num_classes: int, use_difficult: bool):
    """Windows of one image and their overlaps with the ground truth.

    Returns ``windows`` ``float32 [W, 4]`` (every ground-truth box first, then the proposals),
    ``positive`` ``bool [W]`` (a ground-truth box trained on: not difficult unless
    ``use_difficult``), ``overlaps`` ``float32 [W, K]`` (max IoU with any box of class k, difficult
    ones included; 0 when the image has none of k). Column k is class k + 1.
    """
    gt = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    windows = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)])
    positive = np.zeros(len(windows), bool)
    positive[: len(gt)] = trained_objects(record, use_difficult)
    overlaps = np.zeros((len(windows), num_classes), np.float32)
    if len(gt):
        iou = box_iou(windows, gt)  # [W, G]
        for c in np.unique(record.labels):
            overlaps[:, c - 1] = iou[:, record.labels == c].max(axis=1)
    return windows, positive, overlaps


def bboxreg_windows(record, proposals: np.ndarray, min_iou: float, use_difficult: bool):
    """Windows of one image that train a regressor: ``windows`` ``float32 [E, 4]`` (ground-truth
    boxes and proposals with IoU > ``min_iou`` to a used box), ``targets`` ``float32 [E, 4]`` (that
    box of max IoU), ``labels`` ``int64 [E]`` (its class)."""
    used = trained_objects(record, use_difficult)
    gt, labels = np.asarray(record.boxes, np.float32).reshape(-1, 4)[used], np.asarray(record.labels)[used]
    windows = np.concatenate([gt, np.asarray(proposals, np.float32).reshape(-1, 4)])
    if not len(gt):
        return np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    iou = box_iou(windows, gt)  # [W, G]
    best = iou.argmax(axis=1)
    keep = iou[np.arange(len(windows)), best] > min_iou
    return windows[keep], gt[best[keep]], labels[best[keep]].astype(np.int64)


@torch.no_grad()
def window_features(model, maps, record, windows: np.ndarray, batch: int, layer: str = "fc7") -> torch.Tensor:
    """``pool5`` or ``fc7`` features ``float32 [W, D]`` (CPU) of ``windows`` ``[W, 4]`` of one image,
    from its conv5 ``maps``, ``batch`` windows at a time."""
    device = model.device
    maps = [m.to(device=device, dtype=torch.float32) for m in maps]
    dim = model.pool5_dim if layer == "pool5" else model.head.out_dim
    out = torch.empty((len(windows), dim))
    for start in range(0, len(windows), batch):
        chunk = torch.from_numpy(windows[start:start + batch]).to(device)
        feats = model.pool5(maps, image_hw=(record.height, record.width), windows=chunk)
        if layer == "fc7":
            feats = model.fc7(feats)
        out[start:start + len(chunk)] = feats.float().cpu()
    return out
