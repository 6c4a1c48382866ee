"""Detection outputs other tools read, besides ``detections.jsonl`` (``detect.format``).

- ``coco``: ``detections_coco.json``, a COCO results list (what detectron2 and MMDetection write:
  ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``) and ``coco_images.json``, the
  COCO dataset part it refers to (``images`` with ``file_name`` relative to ``detect.source``,
  ``width``, ``height``; ``categories`` 1..K in the model's class order; no ``annotations``).
  ``COCO("coco_images.json").loadRes("detections_coco.json")`` loads them in pycocotools; FiftyOne's
  ``add_coco_labels`` takes the results list. COCO pixels are continuous with the origin at the
  image's top-left corner, as the internal convention, so ``[x, y, w, h] = [x1, y1, x2 - x1, y2 - y1]``.
- ``voc``: one Pascal VOC XML file per image under ``voc/`` (named after the image's stem, a short
  hash added when two inputs share one), ``<object>`` per detection with ``<name>``, integer
  1-based inclusive ``<bndbox>`` (``xmin = round(x1) + 1, xmax = round(x2)``: the internal box to
  within half a pixel), ``<difficult>0``, and the score in ``<score>`` (which annotation tools
  ignore). labelImg and CVAT open these for correction; ``spp_det.data.voc`` reads them. The files
  mirror the input tree (``voc/<folders>/<stem>.xml``, the annotated copy's safe relative name).
- ``labelstudio``: ``labelstudio_tasks.json``, Label Studio tasks with pre-annotations: one task per
  image, ``{"data": {"image": URL}, "predictions": [{"model_version", "score", "result": [...]}]}``,
  each result a ``rectanglelabels`` region with ``x, y, width, height`` in percent of the image and
  its ``score``; ``labelstudio_config.xml`` is the labelling interface they fit (``<Image
  name="image">``, ``<RectangleLabels name="label">`` with the model's classes). The URL is
  ``detect.labelstudio_url`` + the path relative to ``detect.source`` (images served over HTTP or
  cloud storage), else Label Studio's local files: ``/data/local-files/?d=<path relative to
  detect.labelstudio_root>`` (``LOCAL_FILES_DOCUMENT_ROOT``; default ``detect.source``). Label Studio
  imports predictions only in this JSON (VOC XML is not importable there). ``read_labelstudio`` reads it.
- ``yolo``: ``yolo/labels/<relative path>.txt`` mirroring the input tree (the image's own folders and
  stem, so Ultralytics and CVAT pair a label file with its image by name) with one line
  ``class cx cy w h`` per detection (0-based class index, centre and size normalised by the image's
  width and height), and ``yolo/classes.txt`` (one class name per line, index order). Two images of
  one folder with the same stem (``a.jpg``, ``a.png``) cannot both have ``a.txt``: the later one is
  written ``a.png.txt`` with a warning. ``read_yolo`` reads the tree.
"""
from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath

import numpy as np

from spp_det.structures import Detections
from spp_det.errors import UserError
from spp_det.io import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "coco", "voc", "labelstudio", "yolo")  # jsonl is always written
COCO_RESULTS = "detections_coco.json"
COCO_IMAGES = "coco_images.json"
VOC_DIR = "voc"
LABELSTUDIO_TASKS = "labelstudio_tasks.json"
LABELSTUDIO_CONFIG = "labelstudio_config.xml"
LABELSTUDIO_LOCAL_FILES = "/data/local-files/?d="  # Label Studio's URL of a file under LOCAL_FILES_DOCUMENT_ROOT
YOLO_DIR = "yolo"


def parse_formats(value) -> list[str]:
    """``detect.format`` (a name or a list of names) -> the formats to write, ``jsonl`` first."""
    names = [value] if isinstance(value, str) else list(value or [])
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserError(f"detect.format: unknown format(s) {unknown}; choose from {list(FORMATS)}, e.g. "
                        "detect.format=[jsonl,coco,voc,labelstudio,yolo]")
    return ["jsonl", *(f for f in FORMATS[1:] if f in names)]


class CocoWriter:
    """Collects images and detections; ``close()`` writes both COCO files atomically.

    Every writer here takes ``add(file_name, image_path, width, height, dets, output_name)`` per image
    (``file_name``: the path relative to ``detect.source``; ``output_name``: the annotated copy's safe
    relative name) and ``close() -> [files written]``."""

    def __init__(self, output: Path, classes):
        self.output = Path(output)
        self.classes = list(classes)
        self.images: list[dict] = []
        self.results: list[dict] = []

    def add(self, file_name: str, image_path: Path, width: int, height: int, dets: Detections,
            output_name: str) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            self.results.append({"image_id": image_id, "category_id": int(label),
                                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                 "score": round(float(score), 6)})

    def close(self) -> list[Path]:
        dataset = {"info": {"description": "spp-det detections: the images they refer to"},
                   "images": self.images, "annotations": [],
                   "categories": [{"id": k, "name": name, "supercategory": "object"}
                                  for k, name in enumerate(self.classes, start=1)]}
        paths = [self.output / COCO_IMAGES, self.output / COCO_RESULTS]
        for path, payload in zip(paths, (dataset, self.results)):
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
        return paths


def voc_xml(file_name: str, image_path: Path, width: int, height: int, dets: Detections, classes) -> str:
    """Pascal VOC annotation text of one image's detections (module docstring)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = PurePath(file_name).parent.name or Path(image_path).parent.name
    ET.SubElement(root, "filename").text = PurePath(file_name).name
    ET.SubElement(root, "path").text = str(Path(image_path).resolve())
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "spp-det detections"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(value))
    ET.SubElement(root, "segmented").text = "0"
    for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
        x1, y1, x2, y2 = (int(np.round(v)) for v in box)
        xmin, ymin = min(max(x1 + 1, 1), width), min(max(y1 + 1, 1), height)
        xmax, ymax = max(min(x2, width), xmin), max(min(y2, height), ymin)  # at least one pixel
        obj = ET.SubElement(root, "object")
        for tag, value in (("name", classes[int(label) - 1]), ("pose", "Unspecified"), ("truncated", "0"),
                           ("difficult", "0"), ("score", f"{float(score):.6g}")):
            ET.SubElement(obj, tag).text = value
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


class VocWriter:
    """One XML file per image under ``output/voc/``, mirroring the input tree."""

    def __init__(self, output: Path, classes):
        self.folder = Path(output) / VOC_DIR
        self.classes = list(classes)
        self.used: set[str] = set()
        self.written: list[Path] = []

    def add(self, file_name: str, image_path: Path, width: int, height: int, dets: Detections,
            output_name: str) -> Path:
        """Write ``voc/<output name without suffix>.xml`` (the image's own relative name for a plain
        one), with a hash of ``file_name`` added when taken (a.jpg, a.png)."""
        stem = PurePath(output_name).with_suffix("").as_posix()
        name = stem
        if name.casefold() in self.used:
            name = f"{stem}-{hashlib.sha1(file_name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        self.used.add(name.casefold())
        path = self.folder / f"{name}.xml"
        with atomic_path(path) as tmp:
            tmp.write_text(voc_xml(file_name, image_path, width, height, dets, self.classes), encoding="utf-8")
        self.written.append(path)
        return path

    def close(self) -> list[Path]:
        return [self.folder] if self.written else []


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class LabelStudioWriter:
    """Label Studio tasks with predictions (module docstring); ``close()`` writes the tasks JSON and
    the labelling config atomically. ``url_prefix``: the images' URL prefix, or None for Label
    Studio's local files under ``local_root`` (the folder ``file_name`` is relative to: ``base``)."""

    def __init__(self, output: Path, classes, base: Path, *, url_prefix: str | None, local_root: str | None,
                 model_version: str = "spp-det"):
        self.output, self.classes, self.model_version = Path(output), list(classes), model_version
        self.base, self.url_prefix = Path(base).resolve(), url_prefix
        self.local_root = Path(local_root).resolve() if local_root else self.base
        if url_prefix is None and not self.base.is_relative_to(self.local_root):
            raise UserError(f"detect.labelstudio_root={local_root}: the images ({self.base}) are not inside it; "
                            "give the folder Label Studio serves as LOCAL_FILES_DOCUMENT_ROOT")
        self.tasks: list[dict] = []

    def url(self, file_name: str) -> str:
        """The task's ``data.image`` of the image at ``file_name`` (relative to ``detect.source``)."""
        if self.url_prefix is not None:
            return self.url_prefix + urllib.parse.quote(file_name)
        relative = (self.base / file_name).relative_to(self.local_root).as_posix()
        return LABELSTUDIO_LOCAL_FILES + urllib.parse.quote(relative, safe="/")

    def add(self, file_name: str, image_path: Path, width: int, height: int, dets: Detections,
            output_name: str) -> None:
        result = []
        for n, (box, score, label) in enumerate(zip(dets.boxes, dets.scores, dets.labels)):
            x1, y1, x2, y2 = (float(v) for v in box)
            result.append({
                "id": f"r{n}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": int(width), "original_height": int(height), "image_rotation": 0,
                "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                          "height": 100 * (y2 - y1) / height, "rotation": 0,
                          "rectanglelabels": [self.classes[int(label) - 1]]},
                "score": round(float(score), 6)})
        prediction = {"model_version": self.model_version, "result": result}
        if len(dets):  # the prediction's score (optional in Label Studio): its best region's
            prediction["score"] = round(float(np.max(dets.scores)), 6)
        self.tasks.append({"data": {"image": self.url(file_name)}, "predictions": [prediction]})

    def close(self) -> list[Path]:
        config = "\n".join(['<View>', '  <Image name="image" value="$image"/>',
                            '  <RectangleLabels name="label" toName="image">',
                            *(f'    <Label value="{_xml_attribute(c)}"/>' for c in self.classes),
                            '  </RectangleLabels>', '</View>', ''])
        paths = [self.output / LABELSTUDIO_TASKS, self.output / LABELSTUDIO_CONFIG]
        _write_text(paths[0], json.dumps(self.tasks, ensure_ascii=False, indent=1) + "\n")
        _write_text(paths[1], config)
        return paths


def _xml_attribute(text: str) -> str:
    from xml.sax.saxutils import quoteattr

    return quoteattr(text)[1:-1]


def read_labelstudio(path: Path, classes) -> dict[str, tuple[tuple[int, int], Detections]]:
    """``labelstudio_tasks.json`` -> image URL -> ((width, height), ``Detections`` in pixels): the
    regions of each task's first prediction, by Label Studio's rules (percent of the original size)."""
    out = {}
    for task in json.loads(Path(path).read_text(encoding="utf-8")):
        boxes, scores, labels, size = [], [], [], None
        for region in task["predictions"][0]["result"]:
            v, w, h = region["value"], region["original_width"], region["original_height"]
            size = (w, h)
            x1, y1 = v["x"] * w / 100, v["y"] * h / 100
            boxes.append([x1, y1, x1 + v["width"] * w / 100, y1 + v["height"] * h / 100])
            scores.append(region["score"])
            labels.append(list(classes).index(v["rectanglelabels"][0]) + 1)
        out[task["data"]["image"]] = (size, Detections(np.reshape(boxes, (-1, 4)), scores, labels))
    return out


class YoloWriter:
    """``yolo/labels/<relative path>.txt`` per image and ``yolo/classes.txt`` (module docstring)."""

    def __init__(self, output: Path, classes):
        self.folder = Path(output) / YOLO_DIR
        self.classes = list(classes)
        self.used: dict[str, str] = {}  # label file (casefolded) -> the image that has it

    def label_path(self, file_name: str) -> Path:
        """``labels/<folders>/<stem>.txt`` of the image ``file_name``; ``<name>.txt`` when an earlier
        image of the same folder took that (same stem, another suffix; a warning says so)."""
        relative = PurePath(file_name)
        name = relative.with_suffix(".txt").as_posix()
        if name.casefold() in self.used:
            log.warning("yolo: %s and %s share the label file %s; %s's labels go to %s.txt, which tools pairing "
                        "labels by stem will not find", self.used[name.casefold()], file_name, name, file_name,
                        relative.as_posix())
            name = relative.as_posix() + ".txt"
        self.used[name.casefold()] = file_name
        return self.folder / "labels" / name

    def add(self, file_name: str, image_path: Path, width: int, height: int, dets: Detections,
            output_name: str) -> Path:
        lines = []
        for box, label in zip(dets.boxes, dets.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            lines.append(f"{int(label) - 1} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                         f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
        path = self.label_path(file_name)
        _write_text(path, "".join(lines))
        return path

    def close(self) -> list[Path]:
        _write_text(self.folder / "classes.txt", "".join(f"{c}\n" for c in self.classes))
        return [self.folder / "classes.txt", self.folder / "labels"]


def read_yolo(folder: Path, sizes: dict[str, tuple[int, int]]) -> tuple[list[str], dict[str, Detections]]:
    """A YOLO tree (``classes.txt``, ``labels/**/*.txt``) -> (class names, label file relative to
    ``labels/`` -> ``Detections`` in pixels, scores 1), with the image sizes ``sizes`` (width, height)
    keyed like the result. A line that is not ``class cx cy w h`` is an error naming the file."""
    folder = Path(folder)
    classes = (folder / "classes.txt").read_text(encoding="utf-8").splitlines()
    out = {}
    for path in sorted((folder / "labels").rglob("*.txt")):
        key = path.relative_to(folder / "labels").as_posix()
        width, height = sizes[key]
        rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any(len(r) != 5 for r in rows):
            raise UserError(f"{path}: not YOLO labels (each line: class cx cy w h)")
        values = np.array(rows, np.float64).reshape(-1, 5)
        cx, cy, w, h = values[:, 1] * width, values[:, 2] * height, values[:, 3] * width, values[:, 4] * height
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        out[key] = Detections(boxes, np.ones(len(values)), values[:, 0].astype(np.int64) + 1)
    return classes, out


def open_writers(formats, output: Path, classes, base: Path, labelstudio_url: str | None = None,
                 labelstudio_root: str | None = None) -> list:
    """The writers of ``formats`` besides jsonl (``parse_formats``), made before any work so a bad
    setting stops the run first."""
    makers = {"coco": lambda: CocoWriter(output, classes), "voc": lambda: VocWriter(output, classes),
              "labelstudio": lambda: LabelStudioWriter(output, classes, base, url_prefix=labelstudio_url,
                                                       local_root=labelstudio_root),
              "yolo": lambda: YoloWriter(output, classes)}
    return [makers[name]() for name in formats if name in makers]
