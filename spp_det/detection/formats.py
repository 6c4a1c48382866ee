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
  ignore). labelImg and CVAT open these for correction; ``spp_det.data.voc`` reads them.
"""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath

import numpy as np

from spp_det.structures import Detections
from spp_det.errors import UserError
from spp_det.io import atomic_path

FORMATS = ("jsonl", "coco", "voc")  # jsonl is always written
COCO_RESULTS = "detections_coco.json"
COCO_IMAGES = "coco_images.json"
VOC_DIR = "voc"


def parse_formats(value) -> list[str]:
    """``detect.format`` (a name or a list of names) -> the formats to write, ``jsonl`` first."""
    names = [value] if isinstance(value, str) else list(value or [])
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise UserError(f"detect.format: unknown format(s) {unknown}; choose from {list(FORMATS)}, e.g. "
                        "detect.format=[jsonl,coco,voc]")
    return ["jsonl", *(f for f in FORMATS[1:] if f in names)]


class CocoWriter:
    """Collects images and detections; ``close()`` writes both COCO files atomically."""

    def __init__(self, output: Path, classes):
        self.output = Path(output)
        self.classes = list(classes)
        self.images: list[dict] = []
        self.results: list[dict] = []

    def add(self, file_name: str, width: int, height: int, dets: Detections) -> None:
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
    """One XML file per image under ``output/voc/``."""

    def __init__(self, output: Path, classes):
        self.folder = Path(output) / VOC_DIR
        self.classes = list(classes)
        self.used: set[str] = set()

    def add(self, file_name: str, image_path: Path, width: int, height: int, dets: Detections, stem: str) -> Path:
        """Write ``voc/<stem>.xml``; ``stem``: the stem of the image's safe output name (the image's
        own stem for a plain file name), with a hash of ``file_name`` added when taken (a.jpg, a.png)."""
        name = stem
        if name.casefold() in self.used:
            name = f"{stem}-{hashlib.sha1(file_name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        self.used.add(name.casefold())
        path = self.folder / f"{name}.xml"
        with atomic_path(path) as tmp:
            tmp.write_text(voc_xml(file_name, image_path, width, height, dets, self.classes), encoding="utf-8")
        return path
