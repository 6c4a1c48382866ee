"""``spp-det eval``: VOC (devkit-exact) and COCO-style evaluation on a test split.

Two modes:

- ``spp-det eval eval.checkpoint=model.pt data.root=... data.test_split=test`` runs the trained
  detector over the split (cached proposals reused) and scores its detections;
- ``spp-det eval eval.results_dir=DIR data.root=... data.test_split=test`` scores an existing
  folder of ``comp4_det_<split>_<class>.txt`` files, loading no model (to compare detectors).

Writes in the run directory: the result files (model mode), ``metrics.json``, ``pr_curves.png``,
``eval_data.json`` (ground truth and detections, what the report reads) and ``report.html``
(``spp_det.evaluation.report``); prints the per-class table. ``evaluate_detector`` is the same thing as a function, for the
training stages and the demo.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from spp_det import distributed
from spp_det.data.voc import load_split
from spp_det.errors import UserError
from spp_det.evaluation.coco import coco_evaluate
from spp_det.evaluation import reference
from spp_det.evaluation.plots import plot_pr_curves
from spp_det.evaluation.report import build_report, checkpoint_info, write_eval_data
from spp_det.evaluation.results import read_results, write_results
from spp_det.evaluation.voc_ap import VOCEvaluator
from spp_det.io import write_json
from spp_det.proposals import ProposalPrefetcher
from spp_det.runtime import run_dir, search_workers
from spp_det.settings import RunSettings
from spp_det.structures import Detections
from spp_det.timing import timed

log = logging.getLogger(__name__)

def score_detections(
    records,
    classes,
    detections: dict[str, Detections],
    split: str,
    out_dir: str | Path | None = None,
    write_result_files: bool = True,
    coco: bool = True,
    extra: dict | None = None,
    run_info: dict | None = None,
) -> dict:
    """VOC and COCO numbers of ``detections`` (image id -> ``Detections``) on ``records``.

    With ``out_dir``: writes the VOC result files (unless ``write_result_files`` is false),
    ``metrics.json`` (everything below but the PR curves, plus ``extra``), ``pr_curves.png`` and
    ``eval_data.json`` (with ``run_info``: config, checkpoint, ...; see ``report``).
    Returns ``VOCEvaluator.evaluate()``'s dict plus ``coco`` and ``coco_per_class`` (None without
    COCO numbers), ``num_images``, ``num_detections``.
    """
    evaluator = VOCEvaluator(records, classes)
    for r in records:  # split order, so equal scores rank as in the result files
        evaluator.process(r.image_id, detections.get(r.image_id, Detections.empty()))
    metrics = evaluator.evaluate()
    metrics["coco"], metrics["coco_per_class"] = coco_evaluate(records, classes, detections) if coco else (None, None)
    metrics["num_images"] = len(records)
    metrics["num_detections"] = int(sum(len(d) for d in detections.values()))
    metrics.update(extra or {})
    if out_dir is not None:
        out_dir = Path(out_dir)
        if write_result_files:
            write_results(out_dir, split, classes, {r.image_id: detections.get(r.image_id, Detections.empty())
                                                   for r in records})
        write_json({k: v for k, v in metrics.items() if k != "pr_curves"}, out_dir / "metrics.json")
        plot_pr_curves(metrics, out_dir / "pr_curves.png", title=f"split {split}")
        write_eval_data(out_dir, split, classes, records, detections, run_info)
    return metrics


def proposal_stream(records, rs: RunSettings):
    """Selective search of ``records`` (cached) that runs ahead of the network in worker processes:
    ``.get(path, image) -> f32 [N, 4]`` (``spp_det.proposals.ProposalPrefetcher``)."""
    return ProposalPrefetcher([r.path for r in records], rs.proposals, rs.cache_dir, search_workers(rs.num_workers))


def run_detector(detector, records, rs: RunSettings, proposals: dict | None = None,
                 without_bbox_reg: dict | None = None) -> tuple[dict[str, Detections], dict]:
    """Detections of every record (image id -> ``Detections``) and seconds per image by step.

    ``proposals``: image id -> ``f32 [N, 4]``; when None, selective search (cached) runs on the next
    images in worker processes while the network works on the current one (``proposal_stream``),
    and ``proposals`` in the timings is the time the network waited for it.
    ``without_bbox_reg``: a dict to fill with the detections before box regression, from the
    same pass (needs box regression on and a detector with ``detect_pair``).
    """
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    e = rs.eval
    detections = {}
    stream = proposal_stream(records, rs) if proposals is None else None
    try:
        for r in tqdm(records, desc="detect", unit="image"):
            with timed(timings, "load_image"):
                image = r.load_image()
            if stream is not None:
                with timed(timings, "proposals"):
                    boxes = stream.get(r.path, image)
            else:
                boxes = proposals[r.image_id]
            if without_bbox_reg is not None:
                detections[r.image_id], without_bbox_reg[r.image_id] = detector.detect_pair(
                    image, boxes, e.score_thresh, e.nms_iou, e.max_per_image, timings)
            else:
                detections[r.image_id] = detector.detect(image, boxes, e.score_thresh, e.nms_iou, e.max_per_image,
                                                         e.bbox_reg, timings)
    finally:
        if stream is not None:
            stream.close()
    timings["total"] = time.perf_counter() - start_all
    n = max(len(records), 1)
    return detections, {k: v / n for k, v in timings.items()}


def check_classes(detector_classes, data_classes, source: str) -> None:
    if list(detector_classes) != list(data_classes):
        raise UserError(f"{source}: the model detects classes {list(detector_classes)}, but data.classes is "
                        f"{list(data_classes)}; evaluate with the data config the model was trained with")


def evaluate_detector(detector, records, rs: RunSettings, out_dir: str | Path | None = None,
                      proposals: dict | None = None, run_info: dict | None = None) -> dict | None:
    """Run ``detector`` over ``records`` and score it (see ``score_detections``); ``metrics`` gains
    ``seconds_per_image`` by step (proposals, load_image, and the detector's conv5, pool, fc, svm,
    bboxreg, nms) and in all (``total``). Under ``torchrun`` each rank detects its share of the
    images and rank 0 gathers and scores them (``seconds_per_image``: per process, averaged over all
    images); the other ranks return None. ``rs``: the run's settings."""
    compare = bool(rs.eval.bbox_reg and rs.eval.compare_bbox_reg and getattr(detector, "has_bbox_reg", False))
    plain: dict | None = {} if compare else None
    mine = distributed.shard(records)  # every record in one process
    detections, seconds = run_detector(detector, mine, rs, proposals, plain)
    parts = distributed.gather((detections, plain, seconds, len(mine)))
    if parts is None:
        return None
    if len(parts) > 1:  # merged in split order; seconds per image weighted by each rank's number of images
        order = [r.image_id for r in records]
        merged = [{k: v for p in parts for k, v in (p[j] or {}).items()} for j in (0, 1)]
        detections = {i: merged[0][i] for i in order if i in merged[0]}
        plain = {i: merged[1][i] for i in order if i in merged[1]} if compare else None
        seconds = {k: sum(p[2].get(k, 0.0) * p[3] for p in parts) / max(len(records), 1) for k in parts[0][2]}
    extra: dict = {"seconds_per_image": seconds, "scales": list(detector.geometry.scales),
                   "max_size": detector.geometry.max_size, "processes": len(parts)}
    if compare:  # the paper's two rows: SVM scores alone, then with box regression
        before = score_detections(records, list(detector.classes), plain, rs.data.test_split, coco=False)
        extra["without_bbox_reg"] = {k: before[k] for k in ("map_voc07", "map_voc10", "ap_voc07", "ap_voc10")}
    return score_detections(records, list(detector.classes), detections, rs.data.test_split, out_dir,
                            coco=rs.eval.coco, extra=extra, run_info=run_info)


def format_table(metrics: dict) -> str:
    """Per-class table: class, #gt (non-difficult), #det, AP07, AP10 (percent), and the mean; for the
    20 VOC classes also the published AP07 (``spp_det.evaluation.reference``)."""
    names = list(metrics["ap_voc07"])
    width = max([len("mean"), len("class"), *map(len, names)])

    def pct(v):
        return f"{100 * v:6.1f}" if v is not None else "     -"

    paper = reference.column(names)  # the 20 VOC classes: the published per-class AP07 (and mean) beside ours
    ref = [f"  {value:6.1f}" for value in paper] if paper else [""] * (len(names) + 1)

    lines = [f"{'class':<{width}}  {'#gt':>6}  {'#det':>7}  {'AP07':>6}  {'AP10':>6}" + ("   R-CNN" if paper else "")]
    for name, extra in zip(names, ref):
        lines.append(f"{name:<{width}}  {metrics['num_gt'][name]:>6}  {metrics['num_det'][name]:>7}  "
                     f"{pct(metrics['ap_voc07'][name])}  {pct(metrics['ap_voc10'][name])}" + extra)
    lines.append(f"{'mean':<{width}}  {sum(metrics['num_gt'].values()):>6}  {sum(metrics['num_det'].values()):>7}  "
                 f"{pct(metrics['map_voc07'])}  {pct(metrics['map_voc10'])}" + ref[-1])
    if paper:
        lines.append(reference.note())
    if metrics.get("coco"):
        lines.append("COCO-style: " + ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f}'}"
                                                for k, v in metrics["coco"].items()))
    return "\n".join(lines)


def model_classes(rs: RunSettings, detector_classes) -> RunSettings:
    """Score the classes the model detects. The rule: ``data.classes`` need not repeat what model.pt
    records, but classes given on the command line (``data.classes``, or ``synth.classes``, which
    data=synth reads) must match it. The run's own settings say what its command line set
    (``RunSettings.command_line``, filled by the CLI); a config passed whole (scripts, tests) gives
    every key, so its classes must match. Returns the run's settings with the classes scored (the
    config's ``data.classes`` is replaced in place)."""
    if list(detector_classes) != list(rs.data.classes) and not rs.given("data.classes", "synth.classes"):
        log.info("eval: the classes of %s: %s", rs.eval.checkpoint, ", ".join(detector_classes))
        rs.cfg.data.classes = list(detector_classes)  # what eval_data.json's config records
        rs = RunSettings.of(rs.cfg)
    check_classes(detector_classes, rs.data.classes, str(rs.eval.checkpoint))
    return rs


def run(cfg) -> int:
    rs = RunSettings.of(cfg)
    e = rs.eval  # every key there and valid, before any work
    out_dir = run_dir()
    detector = None
    if not e.results_dir:  # the model first: it names the classes to load the split with
        # here only: the detector brings the model and torchvision (+1 s start-up), which scoring result files never needs
        from spp_det.stages import detect as detection_stage

        detector = detection_stage.load_detector(rs, "eval")
        rs = model_classes(rs, detector.classes)
    records = load_split(rs.data, rs.data.test_split)
    classes = list(rs.data.classes)
    run_info = {"config": OmegaConf.to_container(rs.cfg, resolve=True),
                "checkpoint": None if e.results_dir else checkpoint_info(e.checkpoint),
                "results_dir": str(e.results_dir) if e.results_dir else None,
                "similar_classes": None if e.similar_classes is None else [list(g) for g in e.similar_classes]}
    if e.results_dir:
        if not distributed.is_main():  # no model to run: rank 0 scores the files alone
            return 0
        detections = read_results(e.results_dir, rs.data.test_split, classes, [r.image_id for r in records])
        # the result files are the input here: never rewrite them
        metrics = score_detections(records, classes, detections, rs.data.test_split, out_dir,
                                   write_result_files=False, coco=e.coco,
                                   extra={"results_dir": str(e.results_dir)}, run_info=run_info)
    else:
        metrics = evaluate_detector(detector, records, rs, out_dir, run_info=run_info)
        if metrics is None:  # not rank 0 under torchrun: its detections went to rank 0
            return 0
    print(format_table(metrics))
    if "without_bbox_reg" in metrics:
        w = metrics["without_bbox_reg"]
        if w["map_voc07"] is not None and metrics["map_voc07"] is not None:
            print(f"without box regression: mAP VOC07 {100 * w['map_voc07']:.1f}, VOC10 {100 * w['map_voc10']:.1f} "
                  f"(with: {100 * metrics['map_voc07']:.1f}, {100 * metrics['map_voc10']:.1f})")
    report = build_report(out_dir)
    log.info("wrote %s, %s and %s", out_dir / "metrics.json", out_dir / "pr_curves.png", report)
    print(f"report: {report}")
    return 0
