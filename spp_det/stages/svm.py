"""``spp-det svm``: one linear SVM per class on fc7 features, with hard-negative mining.

Follows R-CNN (``rcnn_train.m``), which SPP-net reuses (docs/paper.md, "Faithfulness to the paper"):

1. **positives and feature scale** (first pass over the training images): fc7 of the
   ground-truth boxes (not the difficult ones unless ``data.use_difficult``) of each class, and
   the norms of fc7 of up to ``scale_windows`` random windows in each of the first
   ``scale_images`` images, from which one global factor makes the mean norm ``feature_norm`` (20);
2. **mining** (``epochs`` passes): per image, fc7 of every window (ground-truth boxes and
   proposals) in batches, scored by every class's current SVM; a window is a negative of class
   ``c`` when its IoU with every box of ``c`` is below ``neg_iou`` (0.3) — difficult boxes count
   here, so a difficult object is never mined as a negative — and is cached when it scores above
   ``hard_thresh``; see ``spp_det.heads.svm.ClassSVM`` for retraining and eviction.

Memory stays bounded: only one image's fc7 is held at a time, plus each class's positives and
cached hard negatives (the log reports their count and the peak resident memory). Conv5 maps come
from the content-keyed ``FeatureCache``, so the second pass reads them from disk.

Under ``torchrun`` the classes are split over the ranks (``spp_det.distributed.shard``): every rank
runs pass 1 and the mining passes over all training images, but scores, caches and retrains only
its own classes, and the trained SVMs are gathered. Why classes and not images: mining is
sequential (the SVM that picks an image's hard negatives was retrained on the earlier images'), so
an image split would change the result, while each class's SVM depends on no other class: the
classes split gives the same SVMs as one process. The per-image fc7 pass is repeated on every
rank; the per-class work (scoring, caching, the many retrainings) is what grows with the classes
(20 for VOC, 200 for ILSVRC) and is what is divided.

Writes ``work_dir/svm.pt`` = ``{"weight": [K, D], "bias": [K], "feature_scale": float,
"meta": checkpoint_meta + settings, "stats": per-class mining statistics}`` atomically.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.errors import UserError
from spp_det.heads.svm import ClassSVM, NormMeter, SVMSettings, feature_scale
from spp_det.features.cache import FeatureCache
from spp_det.proposals import record_proposals
from spp_det.runtime import num_workers, peak_rss_mb
from spp_det.settings import RunSettings
from spp_det.stages import declare, heads, stage
from spp_det.stages.curves import record_history
from spp_det.training.windows import svm_windows, training_records, window_features

log = logging.getLogger(__name__)

# keys of cached negatives: image index * KEY_STRIDE + window index (an image has < 2^20 windows)
KEY_STRIDE = 1 << 20


def trivial_objective(positives: int, settings: SVMSettings) -> float:
    """The objective of the trivial SVM ``w = 0, b = -1`` (every window scored -1): each positive
    pays the hinge 2 at weight ``C w1``, no negative pays, the bias costs ``0.5 (1 / B)^2``."""
    return 2 * settings.C * settings.pos_weight * positives + 0.5 / settings.bias_multiplier ** 2


(KEY,) = stage("svm").keys


def outcome(svm: ClassSVM) -> SimpleNamespace:
    """What the artifact and the log need of a trained ``ClassSVM`` (small: no cached features),
    with the counts of its positives and cached negatives in ``positives`` and ``negatives``."""
    return SimpleNamespace(name=svm.name, w=svm.w.cpu(), b=svm.b, trained=svm.trained, history=svm.history,
                           positives=len(svm.positives), negatives=len(svm.negatives), total_added=svm.total_added,
                           total_evicted=svm.total_evicted, retrains=svm.retrains)


def positives_and_scale(rs: RunSettings, model, cache, records, windows_of) -> tuple[list[torch.Tensor], float]:
    """Pass 1: the unscaled fc7 features ``[P_k, D]`` of each class's positives (its ground-truth
    boxes) and the global feature scale (mean norm of a sample of windows -> ``svm.feature_norm``)."""
    scfg, classes = rs.svm, list(rs.data.classes)
    rng = np.random.default_rng(int(rs.seed))
    positives: list[list[torch.Tensor]] = [[] for _ in classes]
    norms = NormMeter()
    scale_images, scale_windows = int(scfg.scale_images), int(scfg.scale_windows)
    for i, rec in enumerate(tqdm(records, desc="svm: positives", unit="image")):
        windows, positive, _ = windows_of(rec)
        pos_idx = np.flatnonzero(positive)
        sample = rng.permutation(len(windows))[:scale_windows] if i < scale_images else np.zeros(0, np.int64)
        wanted = np.concatenate([pos_idx, sample])
        if not len(wanted):
            continue
        feats = window_features(model, cache.conv5(rec), rec, windows[wanted], int(scfg.window_batch))
        for j, idx in enumerate(pos_idx):
            positives[int(rec.labels[idx]) - 1].append(feats[j:j + 1])
        norms.update(feats[len(pos_idx):])
    missing = [name for name, p in zip(classes, positives) if not p]
    if missing:
        raise UserError(f"svm: no positive example (non-difficult ground-truth box) of class(es) "
                        f"{', '.join(missing)} in {rs.data.root} split {rs.data.train_split!r}; "
                        "every class in data.classes needs at least one")
    scale = feature_scale(norms.mean, float(scfg.feature_norm))
    log.info("svm: fc7 mean norm %.3f over %d windows -> feature scale %.5f; positives per class: %s",
             norms.mean, norms.count, scale, {c: sum(len(t) for t in p) for c, p in zip(classes, positives)})
    return [torch.cat(p) for p in positives], scale


def mine_hard_negatives(scfg: SVMSettings, model, cache, records, windows_of, svms: list[ClassSVM], mine: list[int],
                        num_classes: int, scale: float, threads: int = 1) -> None:
    """Pass 2: ``svm.epochs`` passes over ``records`` offering each class's SVM (this rank's classes
    ``mine``) the negatives it scores above the hard threshold; an SVM retrains when enough were
    added, and once more at the end when any were (R-CNN's hard-negative mining).

    The SVMs due after an image retrain side by side in ``threads`` threads (liblinear releases
    the GIL): each class's SVM depends on no other's, so the result is that of one thread."""
    epochs = int(scfg.epochs)
    hard_thresh = float(scfg.hard_thresh)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for epoch in range(epochs if svms else 0):
            bar = tqdm(records, desc=f"svm: mining {epoch + 1}/{epochs}", unit="image")
            for i, rec in enumerate(bar):
                windows, _, overlaps = windows_of(rec)
                negative = overlaps < float(scfg.neg_iou)  # [W, K]
                candidate = np.flatnonzero(negative.any(axis=1))
                if len(candidate):
                    feats = window_features(model, cache.conv5(rec), rec, windows[candidate], int(scfg.window_batch))
                    feats = feats * scale
                    # [K, D] with zero rows for other ranks' classes (torchrun): a product of the same shape as
                    # in one process rounds each class's column the same way, so the same negatives are mined
                    weight, bias = torch.zeros(num_classes, feats.shape[1]), torch.zeros(num_classes)
                    weight[mine] = torch.stack([s.w.to(weight) for s in svms])
                    bias[mine] = torch.tensor([s.b for s in svms])
                    scores = feats @ weight.T + bias  # [M, K]
                    keys = torch.from_numpy(i * KEY_STRIDE + candidate.astype(np.int64))
                    for k, svm in zip(mine, svms):
                        # copy only the negatives that can be cached (an untrained SVM scores 0: all of them)
                        mask = torch.from_numpy(negative[candidate, k]) & (scores[:, k] > hard_thresh)
                        svm.offer(feats[mask], keys[mask], scores[mask, k])
                last = epoch == epochs - 1 and i == len(records) - 1
                due = [svm for svm in svms if svm.needs_training() or (last and svm.num_added > 0)]
                list(pool.map(ClassSVM.retrain, due))
                bar.set_postfix(hard=sum(len(s.negatives) for s in svms), peak_mb=f"{peak_rss_mb():.0f}")


def log_outcome(svms: list[SimpleNamespace], settings: SVMSettings) -> dict:
    """Per-class statistics for the artifact (logged), with a warning for SVMs near the trivial solution."""
    stats = {}
    for s in svms:
        last = s.history[-1]
        stats[s.name] = {"positives": s.positives, "hard_negatives": s.negatives, "added": s.total_added,
                         "evicted": s.total_evicted, "retrains": s.retrains, "objective": last["objective"]}
        log.info("svm: %-12s %5d positives, %6d hard negatives cached (%d added, %d evicted), %d trainings, "
                 "objective %.4f", s.name, s.positives, s.negatives, s.total_added, s.total_evicted,
                 s.retrains, last["objective"])
    trivial = [n for n, st in stats.items() if st["objective"] >= 0.9 * trivial_objective(st["positives"], settings)]
    if trivial:
        log.warning("svm: %d of %d SVMs are near the trivial solution (every window scored -1; objective >= 90%% of "
                    "its %s): fc7 barely separates these classes at svm.C=%g: %s. Their scores rank windows "
                    "poorly; stronger features (pretraining, finetune) or a larger svm.C help", len(trivial), len(svms),
                    "2 C w1 P", settings.C, ", ".join(trivial))
    return stats


def run(cfg) -> int:
    """Train the per-class SVMs (see the module docstring); writes ``work_dir/svm.pt``."""
    rs = RunSettings.of(cfg)
    settings = rs.svm
    t0 = time.perf_counter()
    started = heads.start(rs, KEY)
    if isinstance(started, declare.Skipped):
        return started
    model, device, artifact, key = started
    classes = list(rs.data.classes)
    num_classes = len(classes)
    records, proposals = training_records(rs, settings.flip)
    cache = FeatureCache(rs.cache_dir, model, rs.conv5_cache)

    def windows_of(rec):
        return svm_windows(rec, record_proposals(rec, proposals), num_classes, rs.data.use_difficult)

    positives, scale = positives_and_scale(rs, model, cache, records, windows_of)
    mine = distributed.shard(range(num_classes))  # this rank's classes (all of them in one process)
    svms = [ClassSVM(classes[k], positives[k] * scale, settings, device) for k in mine]
    del positives
    mine_hard_negatives(settings, model, cache, records, windows_of, svms, mine, num_classes, scale,
                        threads=num_workers(rs.num_workers))
    # every class's outcome on every rank, in class order (under torchrun each rank trained its own)
    done = dict(kv for part in distributed.all_gather({k: outcome(s) for k, s in zip(mine, svms)}) for kv in part.items())
    svms = [done[k] for k in range(num_classes)]
    untrained = [s.name for s in svms if not s.trained]
    if untrained:
        raise UserError(f"svm: no negative window for class(es) {', '.join(untrained)} in split "
                        f"{rs.data.train_split!r}; need images with proposals away from those objects")

    record_history(rs, "svm", [  # one row per retraining of each class's SVM during the mining
        {"step": j, "class": s.name, "loss": h["objective"], "pos_loss": h["pos_loss"], "neg_loss": h["neg_loss"],
         "reg_loss": h["reg_loss"], "negatives": h["negatives"], "evicted": h["evicted"], "seconds": h["seconds"]}
        for s in svms for j, h in enumerate(s.history, start=1)])
    stats = log_outcome(svms, settings)
    if distributed.is_main():  # one writer; the others wait below until the artifact is there
        meta = {**io.checkpoint_meta(rs.cfg), "settings": key}
        io.save_torch({"weight": torch.stack([s.w for s in svms]).float(),
                       "bias": torch.tensor([s.b for s in svms]).float(),
                       "feature_scale": float(scale), "meta": meta, "stats": stats}, artifact)
        log.info("svm: wrote %s in %.1f s (peak resident memory %.0f MiB, solver %s)", artifact,
                 time.perf_counter() - t0, peak_rss_mb(), settings.solver)
    distributed.barrier()
    return 0
