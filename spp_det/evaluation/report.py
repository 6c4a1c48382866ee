"""``report.html``: one self-contained page per evaluation run, and ``spp-det report RUN_DIR``.

``spp-det eval`` writes, besides ``metrics.json``, ``eval_data.json`` (format ``DATA_FORMAT``)::

    {"format": "spp-det-eval-data", "version": 1, "split": "test", "classes": [K names],
     "run": {"config": the composed config, "checkpoint": {"path", "bytes", "sha1", "modified"} | null,
             "results_dir": str | null, "similar_classes": [[names], ...] | null},
     "images": [{"id", "path", "width", "height",
                 "gt": [[x1, y1, x2, y2, label, difficult], ...],
                 "det": [[x1, y1, x2, y2, score, label], ...]}, ...]}

(boxes 0-based continuous pixels, labels 1..K, numbers the float32 values of the evaluation), and
then the report from those two files, so ``spp-det report RUN_DIR`` rebuilds it without a model
or the dataset (the dataset's images only for the drawn examples; a missing image is named on
the page). The page holds everything inline (plots and pictures as data: URIs, CSS, no script),
so it opens from the file system and can be copied alone.

Sections: run (config, checkpoint), per-class table (#gt, #det, AP07, AP10, COCO AP/AP50/AP75),
PR curves, Hoiem et al.'s error types at the top-ranked detections, confusion matrix, the best-
and worst-scored test images with true positives, false positives and misses drawn differently,
and seconds per image by step.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
from pathlib import Path

import numpy as np

from spp_det.data.images import ImageError, read_image
from spp_det.data.voc import ImageRecord
from spp_det.draw import draw_boxes
from spp_det.errors import UserError
from spp_det.evaluation import reference
from spp_det.evaluation.analysis import ERROR_TYPES, analyse, best_and_worst
from spp_det.evaluation.plots import ERROR_COLOURS, confusion_figure, error_types_figure, png_bytes, pr_curves_figure
from spp_det.evaluation.voc_ap import VOCEvaluator
from spp_det.io import atomic_path, hash_file, write_json
from spp_det.structures import Detections

log = logging.getLogger(__name__)

DATA_FILE = "eval_data.json"
DATA_FORMAT = "spp-det-eval-data"
DATA_VERSION = 1
REPORT_FILE = "report.html"
NUM_EXAMPLES = 6  # best- and worst-scored images shown, each
EXAMPLE_SIDE = 360  # longer side of a drawn example, pixels
# Drawn examples: true positive, false positive (labelled with its Hoiem type), missed object.
KIND_COLOURS = {"tp": (44, 160, 44), "fp": (214, 39, 40), "miss": (255, 127, 14)}


# ------------------------------------------------------------------------------ eval_data.json


def _f32(v) -> float:
    return float(str(np.float32(v)))  # the shortest text of the float32 value: exact and short


def checkpoint_info(path) -> dict | None:
    """What identifies the evaluated model file: path, size, SHA-1, modification time."""
    if not path:
        return None
    path = Path(str(path))
    if not path.is_file():
        return {"path": str(path)}
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "sha1": hash_file(path),
            "modified": datetime.datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="seconds")}


def write_eval_data(out_dir, split: str, classes, records, detections: dict[str, Detections],
                    run: dict | None = None) -> Path:
    """``out_dir/eval_data.json`` (module docstring) for ``records`` and ``detections`` (image id
    -> ``Detections``); ``run``: config, checkpoint, results_dir, similar_classes."""
    images = []
    for r in records:
        dets = detections.get(r.image_id, Detections.empty())
        images.append({
            "id": r.image_id, "path": str(Path(r.path).resolve()), "width": int(r.width), "height": int(r.height),
            "gt": [[*map(_f32, box), int(label), int(bool(diff))]
                   for box, label, diff in zip(r.boxes, r.labels, r.difficult)],
            "det": [[*map(_f32, box), _f32(score), int(label)]
                    for box, score, label in zip(dets.boxes, dets.scores, dets.labels)],
        })
    data = {"format": DATA_FORMAT, "version": DATA_VERSION, "split": split, "classes": list(classes),
            "run": dict(run or {}), "images": images}
    path = Path(out_dir) / DATA_FILE
    write_json(data, path)
    return path


def read_eval_data(run_dir) -> tuple[dict, list, dict[str, Detections]]:
    """``eval_data.json`` of ``run_dir`` -> (the file's dict without ``images``, records, detections)."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; `spp-det report` reads what `spp-det eval` wrote into its run directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != DATA_FORMAT or data.get("version") != DATA_VERSION:
        raise UserError(f"{path}: not a {DATA_FORMAT} file of version {DATA_VERSION}")
    records, detections = [], {}
    try:
        for im in data["images"]:
            gt = np.asarray(im["gt"], np.float64).reshape(-1, 6)
            det = np.asarray(im["det"], np.float64).reshape(-1, 6)
            n = len(gt)
            records.append(ImageRecord(str(im["id"]), Path(im["path"]), int(im["width"]), int(im["height"]),
                                       gt[:, :4].astype(np.float32), gt[:, 4].astype(np.int64), gt[:, 5] > 0,
                                       np.zeros(n, bool)))
            detections[str(im["id"])] = Detections(det[:, :4], det[:, 4], det[:, 5].astype(np.int64))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed image entry ({type(exc).__name__}: {exc})") from None
    return {k: v for k, v in data.items() if k != "images"}, records, detections


# ---------------------------------------------------------------------------------- the page


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _figure_img(fig, alt: str, element_id: str) -> str:
    return f'<img id="{element_id}" class="plot" alt="{html.escape(alt)}" src="{_data_uri(png_bytes(fig), "image/png")}">'


def _pct(v) -> str:
    return "–" if v is None or v < 0 else f"{100 * v:.1f}"


def _draw_example(record, outcome, classes) -> bytes | None:
    """JPEG of ``record``'s image, scaled to a longer side of ``EXAMPLE_SIDE`` pixels, with ``outcome``'s items
    drawn (misses first, then detections by score); None when the image cannot be read."""
    from PIL import Image

    try:
        image = read_image(record.path, max_pixels=None)
    except (ImageError, OSError) as exc:
        log.warning("report: cannot draw %s (%s)", record.path, exc)
        return None
    canvas = Image.fromarray(image).convert("RGB")
    factor = EXAMPLE_SIDE / max(canvas.size)  # small images enlarged too, so the labels stay readable
    canvas = canvas.resize((max(1, round(canvas.width * factor)), max(1, round(canvas.height * factor))),
                           Image.Resampling.BILINEAR)
    items = sorted(outcome.items, key=lambda it: (it.kind != "miss", it.score or 0.0))
    texts = []
    for it in items:
        name = classes[it.label - 1]
        if it.kind == "miss":
            texts.append(f"missed {name}")
        elif it.kind == "tp":
            texts.append(f"TP {name} {it.score:.2f}")
        else:
            texts.append(f"FP {name} {it.score:.2f} ({it.error})")
    draw_boxes(canvas, [it.box * factor for it in items], [KIND_COLOURS[it.kind] for it in items], texts)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr:nth-child(even) { background: #f5f5f5; }
thead th { border-bottom: 1px solid #999; } tr.mean td { border-top: 1px solid #999; font-weight: bold; }
.plot { max-width: 100%; } .note { color: #555; font-size: 0.9em; } pre { background: #f5f5f5; padding: 0.6em; overflow: auto; font-size: 0.8em; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; } figure { margin: 0; } figcaption { font-size: 0.8em; color: #444; }
.bar { display: inline-block; height: 0.8em; background: #1f77b4; } .key { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.9em; } dt { font-weight: bold; } dd { margin: 0; }
"""


def _table(head: list[str], rows: list[list[str]], element_id: str, last_is_mean: bool = False) -> str:
    out = [f'<table id="{element_id}"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for n, row in enumerate(rows):
        cls = ' class="mean"' if last_is_mean and n == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _run_section(info: dict, metrics: dict, run_dir: Path) -> str:
    import yaml

    run = info.get("run", {})
    ckpt = run.get("checkpoint")
    items = [("run directory", html.escape(str(run_dir.resolve()))), ("split", html.escape(str(info.get("split")))),
             ("images", str(metrics.get("num_images", "?"))), ("detections", str(metrics.get("num_detections", "?")))]
    if ckpt:
        text = html.escape(str(ckpt.get("path")))
        if "sha1" in ckpt:
            text += f" ({ckpt['bytes'] / 2**20:.1f} MiB, SHA-1 {ckpt['sha1'][:12]}, modified {ckpt['modified']})"
        items.append(("checkpoint", text))
    if run.get("results_dir"):
        items.append(("result files", html.escape(str(run["results_dir"])) + " (scored without a model)"))
    if metrics.get("scales"):
        items.append(("test scales", ", ".join(map(str, metrics["scales"])) + f" (max size {metrics.get('max_size')})"))
    out = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"
    if run.get("config"):
        text = yaml.safe_dump(run["config"], sort_keys=False, default_flow_style=None, width=110)
        out += f'<details><summary>configuration</summary><pre id="config">{html.escape(text)}</pre></details>'
    return out


def _class_table(voc: dict, metrics: dict) -> str:
    per_class = metrics.get("coco_per_class") or {}
    rows = []
    for name in voc["ap_voc07"]:
        coco = per_class.get(name) or {}
        rows.append([html.escape(name), str(voc["num_gt"][name]), str(voc["num_det"][name]),
                     _pct(voc["ap_voc07"][name]), _pct(voc["ap_voc10"][name]),
                     _pct(coco.get("AP")), _pct(coco.get("AP50")), _pct(coco.get("AP75"))])
    coco = metrics.get("coco") or {}
    rows.append(["mean", str(sum(voc["num_gt"].values())), str(sum(voc["num_det"].values())),
                 _pct(voc["map_voc07"]), _pct(voc["map_voc10"]),
                 _pct(coco.get("AP")), _pct(coco.get("AP50")), _pct(coco.get("AP75"))])
    head = ["class", "#gt", "#det", "AP07", "AP10", "COCO AP", "AP50", "AP75"]
    notes = ["#gt: non-difficult objects; AP in percent; VOC APs by the devkit's rules (IoU ≥ 0.5), "
             "COCO APs from pycocotools (IoU 0.5:0.95, 0.5, 0.75)."]
    paper = reference.column(voc["ap_voc07"])  # the 20 VOC classes: the published per-class AP07 beside ours
    if paper:
        for row, value in zip(rows, paper):
            row.append(f"{value:.1f}")
        head.append("R-CNN AP07")
        notes.append(html.escape(reference.note()) + ".")
    out = _table(head, rows, "per-class", last_is_mean=True)
    w = metrics.get("without_bbox_reg")
    if w and w.get("map_voc07") is not None:
        notes.append(f"Without box regression (same pass): mAP VOC07 {_pct(w['map_voc07'])}, VOC10 {_pct(w['map_voc10'])}.")
    return out + "".join(f'<p class="note">{n}</p>' for n in notes)


def _errors_section(analysis, types) -> str:
    rows = []
    for name, counts in analysis.errors.items():
        total = sum(counts.values())
        rows.append([html.escape(name), str(total),
                     *(f"{counts[t]} ({100 * counts[t] / total:.0f}%)" if total else "–" for t in types)])
    head = ["class", "top-ranked", *(f'<span class="key" style="background:{c}"></span> {t}'
                                      for t, c in zip(types, ERROR_COLOURS))]
    fig = error_types_figure(analysis.errors, types)
    return (_figure_img(fig, "error types per class", "error-types") + _table(head, rows, "error-table")
            + '<p class="note">Hoiem et al. (ECCV 2012): of each class\'s N highest-scored detections (N = its '
              "number of objects), correct (VOC true positive), localisation (IoU ≥ 0.1 with an object of the "
              "class, duplicates included), similar / other (IoU ≥ 0.1 with an object of a similar / another "
              "class), background (the rest). Detections matching difficult objects are left out.</p>")


def _examples_section(records, analysis, classes) -> str:
    best, worst = best_and_worst(analysis.images, NUM_EXAMPLES)
    legend = " ".join(f'<span class="key" style="background:rgb{c}"></span> {t}' for t, c in
                      zip(("true positive", "false positive (error type)", "missed object"), KIND_COLOURS.values()))
    out = [f'<p class="note">{legend}. Score of an image: TP / (TP + FP + missed) at the top-ranked detections '
           "of every class (as above).</p>"]
    for title, chosen, element_id in (("best", best, "best-images"), ("worst", worst, "worst-images")):
        out.append(f"<h3>{title}-scored images</h3><div class=\"gallery\" id=\"{element_id}\">")
        for outcome in chosen:
            r = records[outcome.index]
            caption = (f"{html.escape(r.image_id)}: {outcome.tp} TP, {outcome.fp} FP, {outcome.missed} missed "
                       f"(score {outcome.score:.2f})")
            jpeg = _draw_example(r, outcome, classes)
            if jpeg is None:
                out.append(f"<figure><figcaption>{caption}<br>image not readable: {html.escape(str(r.path))}"
                           "</figcaption></figure>")
            else:
                out.append(f'<figure><img class="example" alt="{html.escape(r.image_id)}" '
                           f'src="{_data_uri(jpeg, "image/jpeg")}"><figcaption>{caption}</figcaption></figure>')
        out.append("</div>")
    return "".join(out)


def _timing_section(metrics: dict) -> str:
    seconds = metrics.get("seconds_per_image")
    if not seconds:
        return '<p class="note">Not measured (detections read from result files).</p>'
    steps = {k: v for k, v in seconds.items() if k != "total"}
    longest = max(steps.values(), default=0.0) or 1.0
    rows = [[html.escape(k), f"{v:.4f}", f'<span class="bar" style="width:{200 * v / longest:.0f}px"></span>']
            for k, v in steps.items()]
    if "total" in seconds:
        rows.append(["total", f"{seconds['total']:.4f}", ""])
    return _table(["step", "seconds per image", ""], rows, "timing", last_is_mean="total" in seconds)


def build_report(run_dir) -> Path:
    """Write ``run_dir/report.html`` from ``eval_data.json`` and ``metrics.json``; returns its path."""
    run_dir = Path(run_dir)
    info, records, detections = read_eval_data(run_dir)
    metrics_path = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{metrics_path}: cannot read ({exc}); `spp-det report` needs the eval run's metrics.json") from None
    classes = list(info["classes"])
    evaluator = VOCEvaluator(records, classes)
    for r in records:
        evaluator.process(r.image_id, detections[r.image_id])
    voc = evaluator.evaluate()
    analysis = analyse(records, classes, detections, info.get("run", {}).get("similar_classes"))

    title = f"spp-det evaluation: {html.escape(str(info.get('split')))} split, {len(records)} images"
    headline = f"mAP VOC07 {_pct(voc['map_voc07'])}, VOC10 {_pct(voc['map_voc10'])}"
    if metrics.get("coco"):
        headline += f"; COCO AP {_pct(metrics['coco']['AP'])}, AP50 {_pct(metrics['coco']['AP50'])}"
    sections = [
        ("run", "Run", _run_section(info, metrics, run_dir)),
        ("classes", "Per class", _class_table(voc, metrics)),
        ("pr", "Precision-recall curves",
         _figure_img(pr_curves_figure(voc, f"split {info.get('split')}"), "precision-recall curves", "pr-curves")),
        ("errors", "False positives by type (top-ranked detections)", _errors_section(analysis, ERROR_TYPES)),
        ("confusion", "Confusion matrix (top-ranked detections)",
         _figure_img(confusion_figure(analysis.confusion, classes), "confusion matrix", "confusion-matrix")
         + '<p class="note">Rows: true class (background: no object); columns: predicted class (missed: no '
           "top-ranked detection). True positives on the diagonal; a false positive at IoU ≥ 0.5 on an object "
           "of another class that was not found counts as that class.</p>"),
        ("images", "Best and worst test images", _examples_section(records, analysis, classes)),
        ("timing", "Seconds per image by step", _timing_section(metrics)),
    ]
    made = datetime.datetime.now().isoformat(timespec="seconds")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><h1>{title}</h1><p><b>{headline}</b></p>"
            f'<p class="note">Written {made} by spp-det from {DATA_FILE} and metrics.json; '
            f"<code>spp-det report {html.escape(str(run_dir))}</code> rebuilds it. Contents: "
            + " · ".join(f'<a href="#{sid}">{name}</a>' for sid, name, _ in sections) + "</p>"
            + "".join(f'<section id="{sid}"><h2>{name}</h2>{body}</section>' for sid, name, body in sections)
            + "</body></html>\n")
    path = run_dir / REPORT_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
