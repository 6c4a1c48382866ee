"""``spp-det bench``: seconds per image by step, SPP-net against R-CNN mode on the same windows.

On ``bench.num_images`` images of the VOC sample, with ``bench.windows`` windows per image
(random windows of realistic sizes, see :func:`random_windows`), one image at a time, the network
of the ``model`` group (random weights: timing does not depend on them; bench.json's ``"backbone"``
and ``"fc_dim"`` name it): the paper's ZF-5 with fc 4096 under ``'~experiment'`` (``make bench``), EfficientNet-Lite0
with fc 1024 under the default recipe (configs/bench/default.yaml):

* SPP-net: conv5 once per image (``bench.scales_one`` and ``bench.scales_five``), pyramid pooling
  of every window at its best scale, fc6 + fc7;
* R-CNN mode: every window warped to 224 x 224 and run through the same conv layers and head.
  R-CNN mode is timed on ``bench.rcnn_windows`` windows per image and scaled linearly to
  ``bench.windows`` (its cost is the same per window), which the table says.

The table is printed and written as JSON to ``bench.output`` in the run directory. The timing
helpers (:func:`time_spp`, :func:`time_rcnn`, :func:`time_engine`) are reusable by other
benchmarks. Then the whole detector by step on the same images (one scale): selective search
(:func:`time_proposals`, no cache, one process), conv5, pooling, fc, SVM scores, box regression
and NMS (:func:`time_heads`, random weights of the real shapes for ``data.classes``).

``bench.profile=true`` also runs the first image once more under ``torch.profiler`` at one and at
five scales (:func:`profile_spp`) and writes the operators that take the most time, on the GPU when
there is one, as ``profile_<n>scale.txt`` beside ``bench.json`` and in it under ``"profile"``.
"""
from __future__ import annotations

import copy
import io
import logging
import tempfile
from pathlib import Path
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from spp_det.boxes import random_windows
from spp_det.data.voc import load_voc
from spp_det.detection.detector import Detector
from spp_det.detection.onnx_detector import OnnxDetector
from spp_det.errors import UserError
from spp_det.features.rcnn import rcnn_features
from spp_det.inference import compress_fc, set_precision
from spp_det.io import write_json
from spp_det.model import SPPNet, at_scales, build_model
from spp_det.proposals import compute_proposals
from spp_det.runtime import resolve_device, run_dir
from spp_det.settings import RunSettings
from spp_det.stages.export import export_detector, require_onnx

log = logging.getLogger(__name__)


def _timed(fn: Callable, sync: Callable[[], None]):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def _sync_for(model: torch.nn.Module) -> Callable[[], None]:
    device = next(model.parameters()).device
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def conv5_bytes(maps: Sequence[torch.Tensor]) -> int:
    """Bytes of one cache entry (fp16 maps, as ``FeatureCache`` stores them)."""
    buffer = io.BytesIO()
    torch.save({"conv5": [m.detach().to("cpu", torch.float16) for m in maps]}, buffer)
    return buffer.tell()


@torch.inference_mode()
def time_spp(model: SPPNet, image: np.ndarray, windows: np.ndarray, batch_size: int = 1000) -> dict:
    """Seconds for conv5 (all of ``model.scales``), pooling and fc6+fc7 on one image; cache bytes."""
    model.eval()
    sync = _sync_for(model)
    with record_function("spp.conv5"):  # step labels for profile_spp (free when no profiler runs)
        maps, t_conv = _timed(lambda: model.conv5(image), sync)
    with record_function("spp.pool"):
        pool5, t_pool = _timed(lambda: model.pool5(maps, image.shape[:2], windows), sync)
    with record_function("spp.fc"):
        _, t_fc = _timed(lambda: [model.fc7(chunk) for chunk in pool5.split(batch_size)], sync)
    return {"conv5": t_conv, "pool": t_pool, "fc": t_fc, "total": t_conv + t_pool + t_fc,
            "cache_bytes": conv5_bytes(maps)}


@torch.inference_mode()
def time_rcnn(model: SPPNet, image: np.ndarray, windows: np.ndarray, batch_size: int = 32,
              context: float = 16.0, input_size: int = 224) -> dict:
    """Seconds for R-CNN mode (warp + conv + pool + fc) on these windows, and per window."""
    sync = _sync_for(model)
    _, t = _timed(lambda: rcnn_features(model, image, windows, batch_size, context, input_size), sync)
    return {"total": t, "per_window": t / max(1, len(windows))}


def random_detector(model: SPPNet, classes: Sequence[str]) -> Detector:
    """``model`` with random SVMs and box regressors of the real shapes for ``classes`` (cost does not
    depend on the values; random scores keep many windows above the threshold, a pessimistic NMS load)."""
    gen, k = torch.Generator().manual_seed(0), len(classes)
    return Detector(model=model, classes=classes, svm_weight=torch.randn(k, model.head.out_dim, generator=gen) * 0.01,
                    svm_bias=torch.zeros(k), svm_scale=1.0,
                    bbox_weight=torch.randn(k, model.pool5_dim + 1, 4, generator=gen) * 1e-4)


def time_heads(detector: Detector, image: np.ndarray, windows: np.ndarray, score_thresh: float = -1.5,
               nms_iou: float = 0.3, max_per_image: int = 100) -> dict:
    """Seconds for the test-time steps after fc7 on one image, as ``detector.detect`` times them:
    per-class SVM scores, box regression of every window for every class, and post-processing
    (threshold, per-class NMS, top-k)."""
    timings: dict[str, float] = {}
    detector.detect(image, windows, score_thresh, nms_iou, max_per_image, True, timings)
    return {k: timings[k] for k in ("svm", "bboxreg", "nms")}


def time_proposals(images: Sequence[np.ndarray], proposals_cfg) -> dict:
    """Seconds per image of selective search (one process, no cache) and boxes per image."""
    seconds, counts = [], []
    for image in images:
        boxes, t = _timed(lambda: compute_proposals(image, proposals_cfg), lambda: None)
        seconds.append(t)
        counts.append(len(boxes))
    return {"seconds": float(np.mean(seconds)), "boxes": float(np.mean(counts))}


def time_engine(model: SPPNet, images: Sequence[np.ndarray], windows: Sequence[np.ndarray],
                rcnn_windows: int | None = 200, rcnn_model: SPPNet | None = None, rcnn_batch: int = 32,
                rcnn_warp: tuple[float, int] = (16.0, 224)) -> dict:
    """Mean seconds per image by step over ``images`` and their ``windows`` (one image at a time).

    Returns ``{"spp": {conv5, pool, fc, total, cache_bytes}, "rcnn": {measured_windows, total,
    per_window} | absent, "per_image": [...]}``; R-CNN mode (``rcnn_model`` or ``model``) runs on
    the first ``rcnn_windows`` windows, ``rcnn_batch`` crops at a time, each warped with
    ``rcnn_warp`` = (context padding, input size), and its total is scaled linearly to all windows.
    """
    per_image = []
    for image, wins in zip(images, windows):
        row = {"spp": time_spp(model, image, wins)}
        if rcnn_windows:
            subset = wins[: int(rcnn_windows)]
            r = time_rcnn(rcnn_model or model, image, subset, rcnn_batch, *rcnn_warp)
            row["rcnn"] = {"measured_windows": len(subset), "measured_seconds": r["total"],
                           "per_window": r["per_window"], "total": r["per_window"] * len(wins)}
        per_image.append(row)
    mean = lambda key, part: float(np.mean([row[part][key] for row in per_image]))  # noqa: E731
    out = {"spp": {k: mean(k, "spp") for k in ("conv5", "pool", "fc", "total", "cache_bytes")}, "per_image": per_image}
    if rcnn_windows:
        out["rcnn"] = {k: mean(k, "rcnn") for k in ("measured_windows", "measured_seconds", "per_window", "total")}
    return out


def profile_spp(model: SPPNet, image: np.ndarray, windows: np.ndarray, out_file: Path | None = None,
                top: int = 12) -> dict:
    """One ``time_spp`` of ``image`` under ``torch.profiler`` (CPU, and CUDA when the model is there).

    Returns ``{"sort_by", "total_s", "steps": {conv5, pool, fc: s}, "top": [{name, self_s, share,
    calls}]}``: operators by self time on the device that runs the model (self device time on a GPU,
    self CPU time on the CPU), ``share`` of the sum over all operators; writes profiler's own table
    to ``out_file`` when given.
    """
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        times = time_spp(model, image, windows)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.key.startswith("spp.")]
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total_us = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    if out_file is not None:
        Path(out_file).write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    return {"sort_by": sort_by, "total_s": total_us / 1e6,
            "steps": {k: times[k] for k in ("conv5", "pool", "fc")},
            "top": [{"name": e.key, "self_s": self_us(e) / 1e6, "share": self_us(e) / total_us, "calls": e.count}
                    for e in ranked]}


def time_precisions(model: SPPNet, images: Sequence[np.ndarray], windows: Sequence[np.ndarray],
                    precisions: Sequence[str], fc_rank: Sequence[int] | None, rcnn_windows: int,
                    rcnn_batch: int = 32, rcnn_warp: tuple[float, int] = (16.0, 224)) -> dict:
    """SPP-net (``model``'s scales) and R-CNN mode side by side at each of ``precisions``, with the
    fc layers as trained and, when ``fc_rank`` is given, as their truncated SVD
    (``spp_det.inference``): ``{"fp32": {"spp": ..., "rcnn": ..., "speedup": x}, "fp32+svd": ...}``.
    Both sides run the same modified copy of ``model`` under the same autocast, so each ratio
    compares like with like."""
    table = {}
    for precision in precisions:
        for rank in ([None, fc_rank] if fc_rank else [None]):
            variant = compress_fc(copy.deepcopy(model).eval(), rank)
            autocast = set_precision(variant, str(precision))
            time_spp(variant, images[0][:200, :200], windows[0][:50])  # warm-up of the new kernels
            with autocast():
                res = time_engine(variant, images, windows, rcnn_windows=rcnn_windows, rcnn_batch=rcnn_batch,
                                  rcnn_warp=rcnn_warp)
            table[f"{precision}{'+svd' if rank else ''}"] = {
                "spp": {k: res["spp"][k] for k in ("conv5", "pool", "fc", "total")},
                "rcnn": res["rcnn"]["total"], "speedup": res["rcnn"]["total"] / res["spp"]["total"]}
    return table


def run(cfg) -> int | None:
    # Over 60 lines because half of it is the bench.json literal below, one key per line: kept in
    # one piece, it reads as the file's schema.
    rs = RunSettings.of(cfg)
    b, model, classes, e = rs.bench, rs.model, list(rs.data.classes), rs.eval
    device = resolve_device(rs.device)
    records, _ = load_voc(b.root, b.split, classes, b.year, unknown_classes="skip", max_images=int(b.num_images))
    rng = np.random.default_rng(rs.seed)
    images = [r.load_image() for r in records]
    windows = [random_windows(im.shape[0], im.shape[1], int(b.windows), rng) for im in images]

    torch.manual_seed(rs.seed)
    one = at_scales(build_model(model), b.scales_one).to(device).eval()
    five = at_scales(one, b.scales_five)  # the same network (weights) at five scales
    # warm-up (first-call allocations, kernel selection) on a small image, not timed
    time_spp(one, images[0][:200, :200], windows[0][:50])

    log.info("bench: %d images, %d windows each, %s, device %s, %d threads", len(images), int(b.windows),
             model.backbone, device, torch.get_num_threads())
    rcnn_warp = (float(b.rcnn_context), int(b.rcnn_input))
    res_one = time_engine(one, images, windows, rcnn_windows=int(b.rcnn_windows),
                          rcnn_batch=int(b.rcnn_batch), rcnn_warp=rcnn_warp)
    res_five = time_engine(five, images, windows, rcnn_windows=None)
    rcnn = res_one["rcnn"]
    detector = random_detector(one, classes)
    heads = [time_heads(detector, im, w, e.score_thresh, e.nms_iou, e.max_per_image) for im, w in zip(images, windows)]
    steps = {k: float(np.mean([h[k] for h in heads])) for k in ("svm", "bboxreg", "nms")}
    proposals = time_proposals(images, rs.proposals) if b.proposals else None
    pipeline = {  # one image through the whole detector, one scale, as `spp-det eval` runs it
        **({"proposals": proposals["seconds"]} if proposals else {}),
        "conv5": res_one["spp"]["conv5"], "pool": res_one["spp"]["pool"], "fc": res_one["spp"]["fc"], **steps,
    }
    pipeline["total"] = float(sum(pipeline.values()))
    precisions = None
    if b.precisions:
        precisions = time_precisions(one, images, windows, list(b.precisions), b.fc_rank,
                                     int(b.rcnn_windows), int(b.rcnn_batch), rcnn_warp)
    runtimes = None
    if b.onnxruntime:  # the exported detector beside PyTorch (spp_det/stages/export.py)
        try:
            runtimes = time_runtimes(one, images, windows, classes, e.score_thresh, e.nms_iou, e.max_per_image)
        except UserError as exc:  # the onnx extra is not installed: said, not silently left out
            log.warning("bench: onnxruntime not timed: %s", exc)
    profiled = None
    if b.profile:
        profiled = {f"{len(m.scales)}scale": profile_spp(m, images[0], windows[0], run_dir() / f"profile_{len(m.scales)}scale.txt")
                    for m in (one, five)}
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backbone": str(model.backbone) + (f":{model.timm_name}" if model.timm_name else ""),
        "width": float(model.width),
        "fc_dim": int(model.fc_dim),
        "images": [r.image_id for r in records],
        "windows_per_image": int(b.windows),
        "windows": "random, log-uniform sides from 16 px to the image side",
        "scales_one": list(b.scales_one),
        "scales_five": list(b.scales_five),
        "seconds_per_image": {
            "spp_1scale": res_one["spp"],
            "spp_5scale": res_five["spp"],
            "rcnn": rcnn,
        },
        "speedup_1scale": rcnn["total"] / res_one["spp"]["total"],
        "speedup_5scale": rcnn["total"] / res_five["spp"]["total"],
        "cache_bytes_per_image": {"1scale": res_one["spp"]["cache_bytes"], "5scale": res_five["spp"]["cache_bytes"]},
        "note": (f"R-CNN mode measured on {int(b.rcnn_windows)} windows per image "
                 f"({int(b.rcnn_batch)} crops per batch) and scaled linearly to {int(b.windows)}"),
        "detection_steps_1scale": pipeline,
        "proposals": ({"backend": str(rs.proposals.backend),
                       "mode": (f"{len(rs.proposals.passes)} passes" if rs.proposals.passes
                                else str(rs.proposals.mode)),
                       "boxes_per_image": proposals["boxes"]} if proposals else None),
        "per_image": {"spp_1scale": res_one["per_image"], "spp_5scale": res_five["per_image"]},
        **({"profile": profiled} if profiled else {}),
        **({"precisions_1scale": precisions, "fc_rank": list(b.fc_rank) if b.fc_rank else None}
           if precisions else {}),
        **({"runtimes_1scale": runtimes} if runtimes else {}),
    }
    print(format_table(result))
    out = run_dir() / str(b.output)
    write_json(result, out)
    log.info("bench: wrote %s", out)
    return None


def format_table(result: dict) -> str:
    """The bench result as one plain-text table."""
    s1, s5, r = (result["seconds_per_image"][k] for k in ("spp_1scale", "spp_5scale", "rcnn"))
    n = result["windows_per_image"]
    lines = [
        f"seconds per image ({result['backbone']} width {result['width']}, {n} windows, "
        f"{result['device']}, {result['threads']} threads)",
        f"{'step':<22}{'SPP 1 scale':>14}{'SPP 5 scales':>14}{'R-CNN mode':>14}",
        f"{'conv5':<22}{s1['conv5']:>14.3f}{s5['conv5']:>14.3f}{'':>14}",
        f"{'pyramid pooling':<22}{s1['pool']:>14.3f}{s5['pool']:>14.3f}{'':>14}",
        f"{'fc6 + fc7':<22}{s1['fc']:>14.3f}{s5['fc']:>14.3f}{'':>14}",
        f"{'total':<22}{s1['total']:>14.3f}{s5['total']:>14.3f}{r['total']:>14.3f}",
        f"{'speedup over R-CNN':<22}{result['speedup_1scale']:>13.1f}x{result['speedup_5scale']:>13.1f}x{'':>14}",
        f"{'cache MiB per image':<22}{s1['cache_bytes'] / 2**20:>14.2f}{s5['cache_bytes'] / 2**20:>14.2f}{'':>14}",
        f"({result['note']})",
    ]
    if result.get("detection_steps_1scale"):
        steps = result["detection_steps_1scale"]
        lines += ["", "whole detector, seconds per image by step (1 scale"
                  + (f"; selective search {result['proposals']['backend']} {result['proposals']['mode']}, "
                     f"{result['proposals']['boxes_per_image']:.0f} boxes" if result.get("proposals") else "") + ")"]
        lines += [f"  {k:<20}{v:>10.3f}" for k, v in steps.items()]
    if result.get("precisions_1scale"):
        lines += ["", f"one scale at each precision (fc_rank {result['fc_rank']} for +svd; R-CNN mode at the same "
                  "precision on the same windows: the paper's comparison is the fp32 row)",
                  f"  {'precision':<12}{'conv5':>8}{'pool':>8}{'fc':>8}{'SPP':>8}{'R-CNN':>10}{'speedup':>10}"]
        lines += [f"  {name:<12}{row['spp']['conv5']:>8.3f}{row['spp']['pool']:>8.3f}{row['spp']['fc']:>8.3f}"
                  f"{row['spp']['total']:>8.3f}{row['rcnn']:>10.2f}{row['speedup']:>9.1f}x"
                  for name, row in result["precisions_1scale"].items()]
    if result.get("runtimes_1scale"):
        rows = result["runtimes_1scale"]
        steps = [s for s in ("conv5", "pool", "fc", "svm", "bboxreg", "nms") if any(s in r for r in rows.values())]
        lines += ["", "whole detector, one scale, PyTorch against onnxruntime (spp-det export; onnxruntime's fc "
                  "includes its SVMs and box deltas), seconds per image",
                  f"  {'runtime':<13}" + "".join(f"{s:>9}" for s in steps) + f"{'total':>9}{'images/s':>10}"]
        lines += [f"  {name:<13}" + "".join(f"{row.get(s, 0.0):>9.3f}" for s in steps)
                  + f"{row['total']:>9.3f}{row['images_per_second']:>10.2f}" for name, row in rows.items()]
    for name, prof in (result.get("profile") or {}).items():
        lines += ["", f"profile, {name} ({prof['sort_by']}, {prof['total_s']:.3f} s in operators): top operators"]
        lines += [f"  {row['name'][:48]:<50}{row['self_s']:>9.4f} s{100 * row['share']:>6.1f}%{row['calls']:>7} calls"
                  for row in prof["top"][:8]]
    return "\n".join(lines)


def time_runtimes(model, images, windows, classes, score_thresh: float, nms_iou: float, max_per_image: int) -> dict:
    """The whole detector on ``images`` and their ``windows`` (one image at a time),
    PyTorch and onnxruntime side by side on the CPU: ``{"torch" | "onnxruntime": {conv5, pool, fc, svm, bboxreg,
    nms, total: seconds per image; images_per_second}}`` (onnxruntime's ``fc`` holds its SVMs and box
    deltas: one graph). ``model`` (an ``SPPNet`` in eval mode) gets random SVMs and regressors of the real
    shapes (``random_detector``); both runtimes run the same weights and threads."""
    require_onnx()
    if model.device.type != "cpu":  # onnxruntime's CPU build: both runtimes on the CPU
        model = copy.deepcopy(model).cpu()
    detector, out = random_detector(model, classes), {}
    with tempfile.TemporaryDirectory(prefix="spp_det_bench_") as folder:
        export_detector(detector, Path(folder), 18, {}, {"checkpoint": "spp-det bench: random weights"})
        for name, runner in (("torch", detector), ("onnxruntime", OnnxDetector(folder))):
            runner.detect(images[0][:200, :200], windows[0][:50], score_thresh, nms_iou, max_per_image)  # warm-up
            timings: dict[str, float] = {}
            start = time.perf_counter()
            for image, wins in zip(images, windows):
                runner.detect(image, wins, score_thresh, nms_iou, max_per_image, True, timings)
            seconds = time.perf_counter() - start
            out[name] = {**{step: t / len(images) for step, t in timings.items()}, "total": seconds / len(images),
                         "images_per_second": len(images) / seconds}
    return out
