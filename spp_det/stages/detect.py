"""``spp-det detect detect.checkpoint=model.pt detect.source=PATH detect.output=DIR``.

Detects objects in one image or every image of a folder (recursive). Writes, under the output
folder (``detect.output``; the run directory when null):

- ``annotated/<name>``: a copy of each image with boxes, class names and scores drawn; ``<name>``
  mirrors the path relative to ``detect.source`` with safe names (ASCII letters, digits, ``._-`` in
  every folder and file name; a short hash of the original path added whenever a name had to
  change or would collide, so no two inputs share an output). Input files are only ever read.
- ``detections.jsonl``: all detections of the run, JSON lines, one object per detection::

      {"file": "sub/dir/img.jpg", "class": "dog", "score": 0.83, "box": [x1, y1, x2, y2]}

  ``file`` is the path relative to ``detect.source`` (the file name for a single image);
  ``score`` the SVM score; ``box`` in pixels of the image as displayed (EXIF orientation
  applied), internal convention: 0-based, continuous, no "+1" (``x2 - x1`` is the width).
- with ``detect.format=[jsonl,coco,voc,labelstudio,yolo]`` also COCO results JSON
  (``detections_coco.json`` with ``coco_images.json``), Pascal VOC XML per image (``voc/``), Label
  Studio tasks with predictions (``labelstudio_tasks.json``) and YOLO txt labels (``yolo/``):
  ``spp_det.detection.formats``.

``detect.runtime=onnxruntime detect.checkpoint=DIR`` runs the graphs ``spp-det export`` wrote into DIR
(``spp_det.detection.onnx_detector``) with the same pre- and post-processing and the same outputs.

A file that cannot be used (empty, not an image, truncated, too many pixels, detection failed)
is logged with the reason and skipped; the summary line counts skipped files by reason. The
exit code is non-zero only when no image could be processed, or ``detect.strict=true`` and some
file was skipped.

Under ``torchrun`` each rank detects its share of the files (``spp_det.distributed.shard``) and
writes their annotated copies (names are given to all files in input order on every rank, so no
two ranks pick the same); rank 0 gathers the detections and writes ``detections.jsonl``, the COCO
and VOC files and the summary, in input order, as one process would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import unicodedata
from collections import Counter
from pathlib import Path, PurePath

import numpy as np

from spp_det import distributed
from spp_det.artifact import load_export
from spp_det.data.images import ImageError, list_images, read_image
from spp_det.detection.detector import Detector
from spp_det.detection.formats import open_writers, parse_formats
from spp_det.draw import draw_detections
from spp_det.errors import UserError
from spp_det.io import atomic_path
from spp_det.proposals import ProposalPrefetcher
from spp_det.proposals import cached_proposals
from spp_det.runtime import resolve_device, run_dir, search_workers
from spp_det.settings import RunSettings
from spp_det.timing import timed

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 100  # stem length of output names, well below file-system limits (255 bytes)


def checkpoint_path(rs: RunSettings, group: str) -> Path:
    """The model file of the ``group`` (``detect``, ``eval`` or ``export``) that names it (``detect.checkpoint``,
    ...; ``rs``: the run's settings): by default ``work_dir/model.pt``, the file ``spp-det train`` wrote for the
    same ``name``; a clear error naming the key and the run when it is not there. With
    ``runtime=onnxruntime`` the folder ``spp-det export`` wrote."""
    settings = getattr(rs, group)
    checkpoint = settings.checkpoint
    if group != "export" and settings.runtime == "onnxruntime":  # a `spp-det export` folder
        load_export(Path(str(checkpoint)))  # a clear error when it is not one
        return Path(str(checkpoint))
    if not checkpoint:
        raise UserError(f"spp-det {group} needs {group}.checkpoint=PATH (a model.pt written by `spp-det train`)")
    if not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: no model file there ({group}.checkpoint; by default work_dir/model.pt of "
                        f"name={rs.name}): run `spp-det train` with the same name first, or give "
                        f"name=NAME or {group}.checkpoint=FILE")
    return Path(checkpoint)


def load_detector(rs: RunSettings, group: str):
    """``Detector.load(checkpoint, ...)`` with the test-time settings of ``group``: ``eval`` (spp-det
    eval) or ``detect`` (spp-det detect, whose keys default to eval's in configs/detect/default.yaml):
    its ``scales`` / ``max_size`` when set, ``scorer``, ``precision`` and ``fc_rank``; a clear error
    when there is no checkpoint. ``runtime=onnxruntime``: the exported graphs of a ``spp-det export``
    folder (``spp_det.detection.onnx_detector``). ``rs``: the run's settings."""
    settings, checkpoint = getattr(rs, group), checkpoint_path(rs, group)
    if settings.runtime == "onnxruntime":
        from spp_det.detection.onnx_detector import OnnxDetector

        detector = OnnxDetector(checkpoint, test_scales=settings.scales, test_max_size=settings.max_size,
                                scorer=settings.scorer)
    else:
        detector = Detector.load(checkpoint, resolve_device(rs.device), test_scales=settings.scales,
                                 test_max_size=settings.max_size, scorer=settings.scorer, precision=settings.precision,
                                 fc_rank=settings.fc_rank)
    log.info("%s: loaded %s (classes %s); runtime %s, scales %s, max_size %s", group, checkpoint,
             ", ".join(detector.classes), settings.runtime, list(detector.geometry.scales), detector.geometry.max_size)
    return detector


def proposals_for_file(path: Path, image: np.ndarray, rs: RunSettings, prefetch=None) -> np.ndarray:
    """Selective-search boxes ``f32 [N, 4]`` of one file (cached by content + settings), from
    ``prefetch`` (a ``ProposalPrefetcher`` searching the next files meanwhile) when given."""
    return prefetch.get(path, image) if prefetch is not None else cached_proposals(path, image, rs.proposals, rs.cache_dir)


def _safe_part(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._-")


def safe_output_name(relative: PurePath, used: set[str]) -> str:
    """A safe relative name (``a/b/c.jpg``: ASCII letters, digits and ``._-`` in every folder and file
    name, none starting with a dot or dash) for the annotated copy of the input at ``relative``,
    mirroring its folders; distinct from every name in ``used`` (compared case-insensitively), which
    it joins. A short hash of the original path is added to the file name whenever a part had to
    change or the name is taken, so two inputs never share an output (``x y/a.png`` and ``x_y/a.png``).
    The suffix is ``.jpg`` for JPEG inputs and ``.png`` otherwise."""
    relative = PurePath(relative)
    suffix = ".jpg" if relative.suffix.lower() in (".jpg", ".jpeg") else ".png"
    folders = [p for p in relative.parts[:-1] if p not in ("", ".", "..")]
    safe_folders = [_safe_part(p)[:MAX_NAME_CHARS] for p in folders]
    stem = _safe_part(relative.stem)[:MAX_NAME_CHARS] or "image"
    prefix = "".join(f"{p}/" for p in safe_folders if p)
    original = relative.as_posix()
    digest = hashlib.sha1(original.encode("utf-8", "surrogateescape")).hexdigest()
    name = prefix + stem + suffix
    if stem != relative.stem or safe_folders != list(relative.parts[:-1]) or name.casefold() in used:
        name = f"{prefix}{stem}-{digest[:8]}{suffix}"  # changed or colliding: the hash keeps names distinct
    n = 0
    while name.casefold() in used:
        n += 1
        name = f"{prefix}{stem}-{hashlib.sha1(f'{original}#{n}'.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}{suffix}"
    used.add(name.casefold())
    return name


def _reason_kind(reason: str) -> str:
    """Short category of an ``ImageError`` reason, for the summary counts."""
    for key, kind in (("empty file", "empty file"), ("not a recognised", "not an image"),
                      ("exceeds the limit", "too many pixels"), ("cannot decode", "cannot decode"),
                      ("not found", "file not found")):
        if key in reason:
            return kind
    return "unreadable"


def _class_filter(wanted, classes) -> set[int] | None:
    """Labels to keep for ``detect.classes`` (names), or None for all."""
    if wanted is None:
        return None
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise UserError(f"detect.classes: unknown class names {unknown}; the model detects {list(classes)}")
    return {classes.index(c) + 1 for c in wanted}


def _inputs(source: Path, output: Path) -> tuple[list[Path], Path]:
    """Image files to process and the folder their relative names start from."""
    try:
        paths = list_images(source)
    except FileNotFoundError:
        raise UserError(f"detect.source={source}: no such file or folder") from None
    base = source.parent if source.is_file() else source
    out = output.resolve()
    inside = [p for p in paths if p.resolve().is_relative_to(out)]
    if inside:  # outputs of an earlier run into a folder under the source: not inputs
        log.info("ignoring %d files inside the output folder %s", len(inside), output)
        paths = [p for p in paths if p not in inside]
    return paths, base


def detect_files(rs: RunSettings, detector, paths: list[Path], base: Path, names: dict, used_names: set[str], annotated_dir: Path,
                 input_set: set, keep_labels) -> tuple[list[tuple], Counter]:
    """Detect on this rank's share of ``paths`` and draw each annotated image (named ``names[path]``,
    or a new name beside ``used_names`` when that would overwrite an input); returns
    ``(found, skipped)``: ``(input index, relative name, path, width, height, detections, output
    name)`` per file done, and the count of skipped files by reason."""
    from tqdm import tqdm

    d, classes = rs.detect, list(detector.classes)
    skipped: Counter = Counter()
    found: list[tuple] = []
    timings: dict[str, float] = {}

    def skip(path: Path, kind: str, reason: str) -> None:
        skipped[kind] += 1
        log.warning("skipped %s: %s", path, reason)

    index = {path: i for i, path in enumerate(paths)}
    paths = distributed.shard(paths)  # this rank's files (all of them in one process)
    # proposals of the next files in worker processes (half the cores) while the network runs on the rest
    prefetch = ProposalPrefetcher(paths, rs.proposals, rs.cache_dir, search_workers(rs.num_workers),
                                  max_pixels=d.max_pixels)
    with prefetch:
        for path in tqdm(paths, desc="detect", unit="image"):
            relative = path.relative_to(base)
            try:
                with timed(timings, "decode"):
                    image = read_image(path, max_pixels=d.max_pixels)
            except ImageError as exc:
                skip(path, _reason_kind(exc.reason), exc.reason)
                continue
            try:
                with timed(timings, "proposals"):
                    boxes = proposals_for_file(path, image, rs, prefetch)
                dets = detector.detect(image, boxes, d.score_thresh, d.nms_iou, d.max_per_image, d.bbox_reg, timings)
            except Exception as exc:  # one image's failure must not stop a folder run; it is reported
                log.debug("detection failed on %s", path, exc_info=True)
                skip(path, "detection failed", f"detection failed ({type(exc).__name__}: {exc})")
                continue
            if keep_labels is not None:
                dets = dets.select(np.isin(dets.labels, list(keep_labels)))

            name = names[path]
            target = annotated_dir / name
            if target.resolve() in input_set:  # never write onto an input file
                name = safe_output_name(PurePath(f"{relative.as_posix()}#annotated"), used_names)
                target = annotated_dir / name
            with timed(timings, "draw"), atomic_path(target) as out_tmp:
                draw_detections(image, dets, classes).save(out_tmp, format="JPEG" if name.endswith(".jpg") else "PNG",
                                                          **({"quality": 92} if name.endswith(".jpg") else {}))
            height, width = image.shape[:2]
            found.append((index[path], relative.as_posix(), path, width, height, dets, name))
    if found:
        log.info("detect: seconds per image by step in this process (%d images; proposals: waiting for the "
                 "search of other processes, or searching here): %s", len(found),
                 ", ".join(f"{step} {seconds / len(found):.3f}" for step, seconds in timings.items()))
    return found, skipped


def write_detections(found: list[tuple], classes: list[str], jsonl_path: Path, writers: list) -> None:
    """``detections.jsonl`` (one JSON object per detection) and the files of the other formats'
    ``writers`` (``spp_det.detection.formats``), in ``found``'s order."""
    with atomic_path(jsonl_path) as tmp, open(tmp, "w", encoding="utf-8") as jsonl:
        for _, relative, path, width, height, dets, name in found:
            for writer in writers:
                writer.add(relative, path, width, height, dets, name)
            for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
                jsonl.write(json.dumps({"file": relative, "class": classes[int(label) - 1],
                                        "score": round(float(score), 6),
                                        "box": [round(float(v), 2) for v in box]}, ensure_ascii=False) + "\n")


def run(cfg) -> int:
    from omegaconf import OmegaConf

    rs = RunSettings.of(cfg)
    if OmegaConf.is_missing(rs.cfg.detect, "source"):
        raise UserError("spp-det detect needs detect.source=PATH (a folder of images or one image)")
    d = rs.detect
    source = Path(str(d.source))
    formats = parse_formats(d.format)
    output = Path(d.output) if d.output else run_dir()
    paths, base = _inputs(source, output)
    if not paths:
        raise UserError(f"detect.source={source}: no image files found (looked for common image suffixes)")
    input_set = {p.resolve() for p in paths}

    detector = load_detector(rs, "detect")
    classes = list(detector.classes)
    unread = sorted(k for k in rs.command_line or () if k == "data" or k.startswith("data."))
    if unread:  # said, not silently ignored: the classes and everything else come from the model
        log.warning("spp-det detect does not read %s: it detects the classes of the model (%s); "
                    "detect.classes=[...] keeps some of them", ", ".join(unread), ", ".join(classes))
    keep_labels = _class_filter(d.classes, classes)
    annotated_dir = output / "annotated"
    annotated_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = output / "detections.jsonl"
    if jsonl_path.resolve() in input_set:
        raise UserError(f"{jsonl_path}: would overwrite an input file; choose another detect.output")
    writers = open_writers(formats, output, classes, base, d.labelstudio_url, d.labelstudio_root)

    start = time.perf_counter()
    used_names: set[str] = set()
    # every file's output name, in input order (the same on every rank under torchrun)
    names = {path: safe_output_name(path.relative_to(base), used_names) for path in paths}
    found, skipped = detect_files(rs, detector, paths, base, names, used_names, annotated_dir, input_set,
                                  keep_labels)
    parts = distributed.gather((found, skipped))  # rank 0 writes every file's detections, in input order
    if parts is None:
        return 0
    found = sorted((f for part, _ in parts for f in part), key=lambda f: f[0])
    skipped = sum((counts for _, counts in parts), Counter())
    write_detections(found, classes, jsonl_path, writers)
    done, num_detections = len(found), sum(len(f[5]) for f in found)
    written = [jsonl_path, *(p for writer in writers for p in writer.close())]
    seconds = time.perf_counter() - start
    reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
    n_skipped = sum(skipped.values())
    print(f"detect: {done} images done, {n_skipped} skipped" + (f" ({reasons})" if reasons else "")
          + f", {num_detections} detections, {seconds:.1f} s ({done / seconds:.2f} images/s); wrote "
          + f"{', '.join(map(str, written))} and {annotated_dir}/")
    if done == 0:
        log.error("no image could be processed")
        return 1
    if d.strict and n_skipped:
        log.error("detect.strict=true and %d files were skipped", n_skipped)
        return 1
    return 0
