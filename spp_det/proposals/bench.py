"""Proposal quality and speed: boxes per image, recall at IoU 0.5 / 0.7, MABO, seconds per image.

Quality follows Uijlings et al. (IJCV 2013, Sec. 5.1): for every *non-difficult* ground-truth
box, its best overlap (IoU) with any proposal; recall@t is the fraction with best overlap >= t;
ABO of a class is the mean best overlap over its boxes and MABO the mean of ABO over classes.
``abo_all`` is the mean best overlap over all boxes (classes weighted by their box counts).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np

from spp_det.boxes import box_iou
from spp_det.data.images import read_image
from spp_det.io import write_json
from spp_det.proposals.cache import compute_proposals
from spp_det.settings import ProposalsSettings

log = logging.getLogger(__name__)


def proposal_quality(records, boxes_by_id: dict[str, np.ndarray]) -> dict:
    """Recall at IoU 0.5 / 0.7, MABO, overall mean best overlap, boxes per image (non-difficult GT)."""
    best, labels = [], []
    for r in records:
        keep = ~np.asarray(r.difficult, bool)
        gt = np.asarray(r.boxes, np.float32)[keep]
        if len(gt) == 0:
            continue
        boxes = boxes_by_id[r.image_id]
        best.append(box_iou(gt, boxes).max(axis=1) if len(boxes) else np.zeros(len(gt), np.float32))
        labels.append(np.asarray(r.labels)[keep])
    best = np.concatenate(best) if best else np.zeros(0)
    labels = np.concatenate(labels) if labels else np.zeros(0, int)
    per_class = [float(best[labels == c].mean()) for c in np.unique(labels)]
    counts = [len(boxes_by_id[r.image_id]) for r in records]
    return {
        "images": len(records),
        "objects": int(len(best)),
        "boxes_per_image": float(np.mean(counts)) if counts else 0.0,
        "recall_50": float((best >= 0.5).mean()) if len(best) else float("nan"),
        "recall_70": float((best >= 0.7).mean()) if len(best) else float("nan"),
        "mabo": float(np.mean(per_class)) if per_class else float("nan"),
        "abo_all": float(best.mean()) if len(best) else float("nan"),
    }


def _timed(task):
    """Worker: (path, settings) -> (boxes, wall seconds, CPU seconds) for one image (reading excluded)."""
    path, settings = task
    image = read_image(path, max_pixels=None)
    wall, cpu = time.perf_counter(), time.process_time()
    boxes = compute_proposals(image, settings)
    return boxes, time.perf_counter() - wall, time.process_time() - cpu


def _init_worker():
    import cv2

    cv2.setNumThreads(1)


def bench_setting(records, settings: ProposalsSettings, workers: int, progress: bool = True) -> dict:
    """Quality and speed of one setting on ``records``.

    ``sec_per_image`` / ``cpu_sec_per_image``: one process, one image at a time (reading excluded).
    ``images_per_s``: ``workers`` processes on the same images (wall clock, reading included,
    process start excluded). Both are pessimistic on a machine shared with other jobs.
    """
    from tqdm import tqdm

    s = ProposalsSettings.of(settings)
    _init_worker()
    boxes, walls, cpus = {}, [], []
    for r in tqdm(records, desc=f"{s.backend} 1 process", unit="img", disable=not progress):
        b, wall, cpu = _timed((str(r.path), s))
        boxes[r.image_id] = b
        walls.append(wall)
        cpus.append(cpu)
    row = proposal_quality(records, boxes)
    row.update(sec_per_image=float(np.mean(walls)), cpu_sec_per_image=float(np.mean(cpus)))
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            pool.map(int, range(workers))  # wait until every process has started
            start = time.perf_counter()
            list(tqdm(pool.imap_unordered(_timed, [(str(r.path), s) for r in records], chunksize=1),
                      total=len(records), desc=f"{s.backend} {workers} processes", unit="img", disable=not progress))
            row["images_per_s"] = len(records) / (time.perf_counter() - start)
    else:
        row["images_per_s"] = 1.0 / max(row["sec_per_image"], 1e-9)
    row["workers"] = workers
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'dataset':<16} {'setting':<22} {'imgs':>4} {'boxes':>6} {'R@0.5':>6} {'R@0.7':>6} {'MABO':>6} {'ABO':>6} {'s/img':>6} {'cpu s':>6} {'img/s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dataset']:<16} {r['setting']:<22} {r['images']:>4} {r['boxes_per_image']:>6.0f} {r['recall_50']:>6.3f} "
                     f"{r['recall_70']:>6.3f} {r['mabo']:>6.3f} {r['abo_all']:>6.3f} {r['sec_per_image']:>6.2f} "
                     f"{r['cpu_sec_per_image']:>6.2f} {r['images_per_s']:>6.2f} (x{r['workers']})")
    return "\n".join(lines)


def run_benchmark(settings: dict[str, dict], datasets: dict[str, list], workers: int, output: str | Path | None,
                  progress: bool = True) -> list[dict]:
    """Every setting (a proposals group; ``_max_images``: its image limit) on every dataset -> rows (printed
    as a table, written as JSON to ``output``)."""
    rows = []
    for dataset, records in datasets.items():
        for name, group in settings.items():
            limit = group.get("_max_images")
            row = {"dataset": dataset, "setting": name, **bench_setting(
                records[:limit] if limit else records, {k: v for k, v in group.items() if k != "_max_images"}, workers, progress)}
            log.info("%s", json.dumps(row))
            print(format_table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    print(format_table(rows))
    if output:
        write_json({"rows": rows}, output)
    return rows
