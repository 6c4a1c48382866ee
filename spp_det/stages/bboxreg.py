"""``spp-det bboxreg``: one ridge box regressor per class on pool5 features (R-CNN appendix C).

Examples are the windows (ground-truth boxes and proposals) of the training images whose IoU
with some ground-truth box exceeds ``min_iou`` (0.5); the target is that box (the one of max
IoU; its class picks the regressor). Difficult boxes are not targets unless
``data.use_difficult``. pool5 is scaled by one global factor to mean norm ``feature_norm`` (R-CNN
does the same; lambda = 1000 is relative to that scale). Each class keeps a uniform reservoir
sample of at most ``max_per_class`` examples (pool5 stored fp16: it is a max over fp16 conv5 maps,
so nothing is lost), which bounds memory; ``spp_det.heads.bboxreg.fit_regressor`` solves each.

Under ``torchrun`` every rank collects the examples of all training images (the same reservoirs
as one process: their sampling depends on the image order) and solves the ridge regressions of its
share of the classes (``spp_det.distributed.shard``, as the ``svm`` stage); rank 0 gathers them.

Writes ``work_dir/bboxreg.pt`` = ``{"weight": [K, D + 1, 4] (deltas = [scaled pool5, 1] @ W),
"feature_scale": float, "counts": [K] examples seen per class, "meta"}`` atomically.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.boxes import encode_deltas
from spp_det.heads.bboxreg import fit_regressor, predict
from spp_det.heads.svm import NormMeter, feature_scale
from spp_det.features.cache import FeatureCache
from spp_det.proposals import record_proposals
from spp_det.runtime import peak_rss_mb
from spp_det.settings import RunSettings
from spp_det.stages.curves import record_history
from spp_det.stages import declare, heads, stage
from spp_det.training.windows import bboxreg_windows, training_records, window_features

log = logging.getLogger(__name__)

(KEY,) = stage("bboxreg").keys


class Reservoir:
    """A uniform sample of at most ``capacity`` rows from a stream (Vitter's algorithm R;
    ``capacity=None`` keeps every row).

    Holds features ``fp16 [n, D]``, proposals and targets ``float32 [n, 4]``; ``seen`` counts all rows offered.
    """

    def __init__(self, capacity: int | None, rng: np.random.Generator):
        self.capacity, self.rng, self.seen, self.dim = capacity, rng, 0, 0
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, features: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor) -> None:
        features, boxes, targets = features.half(), boxes.float(), targets.float()
        self.dim = features.shape[1]
        n = len(features)
        room = n if self.capacity is None else max(0, min(n, self.capacity - self.seen))
        if room:  # still filling: keep the rows as they come
            self._parts.append((features[:room], boxes[:room], targets[:room]))
            self.seen += room
        if room == n:
            return
        f, b, t = self.dense()
        for j in range(room, n):  # full: row number `seen` replaces a random slot with probability capacity / seen
            self.seen += 1
            slot = int(self.rng.integers(0, self.seen))
            if slot < self.capacity:
                f[slot], b[slot], t[slot] = features[j], boxes[j], targets[j]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sample as ``(features fp16 [n, D], boxes [n, 4], targets [n, 4])``."""
        if not self._parts:
            return torch.zeros(0, self.dim).half(), torch.zeros(0, 4), torch.zeros(0, 4)
        if len(self._parts) > 1:
            self._parts = [tuple(torch.cat(col) for col in zip(*self._parts))]
        return self._parts[0]


def collect_examples(rs: RunSettings, model, cache, records, proposals: dict) -> tuple[list[Reservoir], float]:
    """One pass over ``records``: each class's training examples (pool5 features, proposal, target
    box; at most ``bboxreg.max_per_class``, a uniform sample) and the global pool5 feature scale."""
    bcfg, classes, use_difficult = rs.bboxreg, list(rs.data.classes), rs.data.use_difficult
    batch = int(bcfg.window_batch)
    cap = int(bcfg.max_per_class) if bcfg.max_per_class else None
    rng = np.random.default_rng(int(rs.seed))
    reservoirs = [Reservoir(cap, np.random.default_rng([int(rs.seed), k])) for k in range(len(classes))]
    norms = NormMeter()
    for i, rec in enumerate(tqdm(records, desc="bboxreg: pool5", unit="image")):
        boxes = record_proposals(rec, proposals)
        windows, targets, labels = bboxreg_windows(rec, boxes, float(bcfg.min_iou), use_difficult)
        if i < int(bcfg.scale_images) and len(boxes):
            sample = boxes[rng.permutation(len(boxes))[: int(bcfg.scale_windows)]]
        else:
            sample = np.zeros((0, 4), np.float32)
        if not len(windows) and not len(sample):
            continue
        feats = window_features(model, cache.conv5(rec), rec, np.concatenate([windows, sample]), batch, layer="pool5")
        norms.update(feats[len(windows):])
        for k in np.unique(labels):
            sel = torch.from_numpy(np.flatnonzero(labels == k))
            reservoirs[k - 1].add(feats[sel], torch.from_numpy(windows)[sel], torch.from_numpy(targets)[sel])
    return reservoirs, feature_scale(norms.mean, float(bcfg.feature_norm))


def run(cfg) -> int:
    """Train the per-class box regressors (see the module docstring); writes ``work_dir/bboxreg.pt``."""
    rs = RunSettings.of(cfg)
    bcfg = rs.bboxreg
    t0 = time.perf_counter()
    started = heads.start(rs, KEY)
    if isinstance(started, declare.Skipped):
        return started
    model, device, artifact, key = started
    classes = list(rs.data.classes)
    records, proposals = training_records(rs, flip=False)  # R-CNN: no flips for the regressors
    reservoirs, scale = collect_examples(rs, model, FeatureCache(rs.cache_dir, model, rs.conv5_cache), records, proposals)

    dim = int(model.pool5_dim)
    weight = torch.zeros(len(classes), dim + 1, 4)
    counts, rows = [], []
    mine = set(distributed.shard(range(len(classes))))  # this rank's classes (all of them in one process)
    for k, (name, res) in enumerate(zip(classes, tqdm(reservoirs, desc="bboxreg: ridge", unit="class"))):
        f, b, t = res.dense()
        counts.append(res.seen)
        if k not in mine:
            continue
        if not len(f):  # the svm stage refuses such a class; here the regressor is the identity
            log.warning("bboxreg: class %s has no training example (IoU > %s); its boxes are left as they are",
                        name, bcfg.min_iou)
            continue
        start = time.perf_counter()
        weight[k] = fit_regressor(f.float().to(device) * scale, b.to(device), t.to(device), float(bcfg.lam))
        # training error of the deltas, and without regression (all deltas 0): one row per class
        error = predict(f.float() * scale, weight[k : k + 1])[:, 0] - encode_deltas(b, t)  # [n, 4]
        rows.append({"step": k + 1, "class": name, "loss": float(error.square().mean()),
                     "loss_without": float(encode_deltas(b, t).square().mean()), "examples": res.seen,
                     "seconds": time.perf_counter() - start})
        log.info("bboxreg: %-12s %6d examples (%d used)", name, res.seen, len(f))
    parts = distributed.gather(({k: weight[k] for k in mine}, rows))  # every class's regressor on rank 0
    if distributed.is_main():  # one writer; the others wait below until the artifact is there
        for solved, _ in parts:
            for k, w in solved.items():
                weight[k] = w
        record_history(rs, "bboxreg", sorted((r for _, part in parts for r in part), key=lambda r: r["step"]))
        meta = {**io.checkpoint_meta(rs.cfg), "settings": key}
        io.save_torch({"weight": weight, "feature_scale": float(scale), "counts": counts, "meta": meta}, artifact)
        log.info("bboxreg: wrote %s in %.1f s (pool5 scale %.5f, peak resident memory %.0f MiB)", artifact,
                 time.perf_counter() - t0, scale, peak_rss_mb())
    distributed.barrier()
    return 0
