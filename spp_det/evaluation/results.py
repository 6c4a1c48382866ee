"""VOC result files: ``comp4_det_<split>_<class>.txt``, one line per detection,
``<image_id> <score> <x1> <y1> <x2> <y2>`` in 1-based VOC pixels (what the devkit reads).

Boxes convert at this edge only (``spp_det.boxes.internal_to_voc``: ``x1 + 1, y1 + 1, x2, y2``).
Numbers are written with the shortest text that reads back to the same value, so scoring the
files gives exactly the numbers of scoring in memory. Lines are written image by image in the
split's order, so equal scores keep the same order in both.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from spp_det.boxes import internal_to_voc
from spp_det.structures import Detections
from spp_det.errors import UserError
from spp_det.io import atomic_path

log = logging.getLogger(__name__)

COMP = "comp4"  # devkit competition 4: training data beyond VOC allowed (ImageNet pre-training)


def result_file_name(split: str, class_name: str, comp: str = COMP) -> str:
    return f"{comp}_det_{split}_{class_name}.txt"


def _number(x: float) -> str:
    return repr(float(x))  # shortest text that reads back to the same float


def write_results(out_dir: str | Path, split: str, classes, detections: dict[str, Detections],
                  comp: str = COMP) -> list[Path]:
    """Write one file per class (an empty file for a class without detections); returns the paths.

    ``detections``: image id -> ``Detections`` (labels 1..K, internal boxes), in the split's order.
    """
    out_dir = Path(out_dir)
    lines: list[list[str]] = [[] for _ in classes]
    for image_id, dets in detections.items():
        voc = internal_to_voc(dets.boxes)
        for box, score, label in zip(voc, dets.scores, dets.labels):
            lines[int(label) - 1].append(
                f"{image_id} {_number(np.float32(score))} " + " ".join(_number(v) for v in box))
    paths = []
    for name, class_lines in zip(classes, lines):
        path = out_dir / result_file_name(split, name, comp)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in class_lines))
        paths.append(path)
    return paths


def result_files(results_dir: Path, split: str, classes) -> dict[str, Path]:
    """Class name -> its ``comp<N>_det_<split>_<class>.txt`` in ``results_dir`` (see ``read_results``)."""
    pattern = re.compile(rf"^(comp\d+)_det_{re.escape(split)}_(.+)\.txt$")
    files: dict[str, Path] = {}
    for path in sorted(results_dir.iterdir()):
        match = pattern.match(path.name)
        if not match:
            continue
        name = match.group(2)
        if name not in classes:
            raise UserError(f"{path}: result file for class {name!r}, which is not in data.classes "
                            f"({', '.join(classes)})")
        if name in files:
            raise UserError(f"{path}: a second result file for class {name!r} (also {files[name].name})")
        files[name] = path
    if not files:
        raise UserError(f"{results_dir}: no result files comp4_det_{split}_<class>.txt for split {split!r}")
    missing = [c for c in classes if c not in files]
    if missing:
        log.warning("%s: no result file for %d classes (scored as without detections): %s",
                    results_dir, len(missing), ", ".join(missing))
    return files


def read_results(results_dir: str | Path, split: str, classes, image_ids) -> dict[str, Detections]:
    """Read ``comp<N>_det_<split>_<class>.txt`` files back -> image id -> ``Detections``
    (internal boxes, labels 1..K); every image of ``image_ids`` has an entry.

    Raises ``UserError`` naming the file (and line) for a malformed line, an image id not in the
    split, a file for a class not in ``classes``, two files for one class, or no files at all.
    A class without a file is warned about and has no detections.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"eval.results_dir={results_dir}: no such folder")
    files = result_files(results_dir, split, classes)

    known = set(image_ids)
    per_image: dict[str, list[tuple[float, list[float], int]]] = {i: [] for i in image_ids}
    for label, name in enumerate(classes, start=1):
        if name not in files:
            continue
        path = files[name]
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 6:
                raise UserError(f"{where}: malformed line {line!r}: expected "
                                f"'<image_id> <score> <x1> <y1> <x2> <y2>' (6 fields), got {len(fields)}")
            image_id = fields[0]
            try:
                numbers = [float(v) for v in fields[1:]]
            except ValueError:
                raise UserError(f"{where}: malformed line {line!r}: score and box must be numbers") from None
            if not all(math.isfinite(v) for v in numbers):
                raise UserError(f"{where}: malformed line {line!r}: score and box must be finite numbers")
            if image_id not in known:
                raise UserError(f"{where}: image id {image_id!r} is not in split {split!r}")
            per_image[image_id].append((numbers[0], numbers[1:], label))

    out = {}
    for image_id, rows in per_image.items():
        if not rows:
            out[image_id] = Detections.empty()
            continue
        voc = np.array([r[1] for r in rows], np.float64)
        voc[:, :2] -= 1.0  # VOC 1-based inclusive -> internal 0-based continuous (spp_det.boxes)
        out[image_id] = Detections(voc, np.array([r[0] for r in rows]), np.array([r[2] for r in rows]))
    return out
