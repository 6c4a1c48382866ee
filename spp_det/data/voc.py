"""Pascal VOC layout: split files, XML annotations, image records.

Reads a VOCdevkit-style root (holding ``VOC2007/``, ``VOC2012/`` ...) or one ``VOC<year>``
folder. Boxes are converted once, here, to the internal convention (see ``spp_det.boxes``).
Bad input is an error naming the file, or a counted warning; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from spp_det.boxes import flip_boxes, voc_to_internal
from spp_det.data.images import read_image
from spp_det.errors import UserError
from spp_det.settings import DataSettings

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


class DatasetError(UserError):
    """A dataset file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class ImageRecord:
    """One image and its ground truth.

    ``boxes`` ``float32 [N, 4]`` internal convention (0-based continuous x1, y1, x2, y2);
    ``labels`` ``int64 [N]`` in 1..K (0 is background); ``difficult``, ``truncated`` ``bool [N]``.
    ``flipped`` records a horizontal flip: ``load_image`` returns the mirrored pixels.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray
    flipped: bool = False

    def load_image(self) -> np.ndarray:
        """RGB ``uint8 [H, W, 3]``, mirrored when ``flipped``."""
        image = read_image(self.path, max_pixels=None)
        return np.ascontiguousarray(image[:, ::-1]) if self.flipped else image

    def flip(self) -> "ImageRecord":
        """The horizontally mirrored record (boxes mirrored, pixels mirrored on load)."""
        return dataclasses.replace(self, boxes=flip_boxes(self.boxes, self.width), flipped=not self.flipped)

    @property
    def key(self) -> str:
        """Identifies image and orientation (for caches of per-image results)."""
        return f"{self.image_id}{'_flip' if self.flipped else ''}"


@dataclasses.dataclass
class LoadStats:
    """What the loader skipped or changed, by kind, so the user sees counts, not silence."""

    images: int = 0
    objects: int = 0
    unknown_class: Counter = dataclasses.field(default_factory=Counter)
    empty_boxes: int = 0
    clipped_boxes: int = 0


def find_voc_dir(root: str | Path, year: int | str | None) -> Path:
    """``root`` itself when it holds ``ImageSets/``, else ``root/VOC<year>``."""
    root = Path(root)
    if (root / "ImageSets").is_dir():
        return root
    if year is not None and (root / f"VOC{year}" / "ImageSets").is_dir():
        return root / f"VOC{year}"
    candidates = sorted(p.name for p in root.glob("VOC*") if p.is_dir()) if root.is_dir() else []
    hint = f" (found {', '.join(candidates)}; set data.year)" if candidates else ""
    raise DatasetError(
        f"{root}: not a VOC dataset: expected {root}/ImageSets or {root}/VOC{year}/ImageSets{hint}. "
        "Set data.root to a VOCdevkit folder or one VOC<year> folder (see scripts/get_voc.sh)."
    )


def read_split_ids(voc_dir: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt``."""
    split_file = voc_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (voc_dir / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise DatasetError(f"{split_file}: split file not found (splits here: {', '.join(available) or 'none'})")
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def _text(node: ET.Element, tag: str, xml_path: Path, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise DatasetError(f"{xml_path}: malformed annotation: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml_path: Path) -> float:
    value = _text(node, tag, xml_path)
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{xml_path}: malformed annotation: <{tag}> is {value!r}, not a number") from None


def _image_size(tree: ET.Element, xml_path: Path, image_path: Path) -> tuple[int, int]:
    """``(width, height)`` in pixels from ``<size>``, or from the image header when the XML has none."""
    size = tree.find("size")
    if size is not None and size.find("width") is not None:
        width, height = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))
    else:  # some VOC-layout datasets omit <size>: read it from the image header
        width, height = Image.open(image_path).size
    if width <= 0 or height <= 0:
        raise DatasetError(f"{xml_path}: malformed annotation: image size {width}x{height}")
    return width, height


def _object_box(obj: ET.Element, what: str, xml_path: Path, width: int, height: int,
                stats: LoadStats) -> np.ndarray | None:
    """The object's ``<bndbox>`` as an internal box ``float32 [4]`` clipped to the image (counted in
    ``stats``); None, counted and warned, when nothing of it is left."""
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DatasetError(f"{xml_path}: malformed annotation: {what} has no <bndbox>")
    voc = [_number(bndbox, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax")]
    box = voc_to_internal(np.array(voc))[0]
    clipped = np.array([min(max(box[0], 0), width), min(max(box[1], 0), height),
                        min(max(box[2], 0), width), min(max(box[3], 0), height)], dtype=np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        stats.empty_boxes += 1
        log.warning("%s: %s has a box of zero or negative size %s; skipped", xml_path, what, voc)
        return None
    if not np.array_equal(clipped, box):
        stats.clipped_boxes += 1
    return clipped


def parse_annotation(
    xml_path: Path,
    image_path: Path,
    class_index: dict[str, int],
    unknown_classes: str,
    stats: LoadStats,
) -> ImageRecord:
    """One VOC XML file -> ``ImageRecord`` (boxes converted, clipped, empty ones skipped)."""
    if not xml_path.is_file():
        raise DatasetError(f"{xml_path}: annotation file not found")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: malformed XML: {exc}") from None
    image_id = xml_path.stem
    width, height = _image_size(tree, xml_path, image_path)

    boxes, labels, difficult, truncated = [], [], [], []
    for i, obj in enumerate(tree.findall("object")):
        name = _text(obj, "name", xml_path).strip()
        if name not in class_index:
            if unknown_classes == "skip":
                stats.unknown_class[name] += 1
                continue
            raise DatasetError(
                f"{xml_path}: object {i} has class {name!r}, which is not in data.classes "
                f"({', '.join(class_index)}); add it, or set data.unknown_classes=skip"
            )
        box = _object_box(obj, f"object {i} ({name})", xml_path, width, height, stats)
        if box is None:
            continue
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(_text(obj, "difficult", xml_path, default="0") == "1")
        truncated.append(_text(obj, "truncated", xml_path, default="0") == "1")
    stats.objects += len(boxes)
    return ImageRecord(
        image_id=image_id,
        path=image_path,
        width=width,
        height=height,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.array(difficult, dtype=bool),
        truncated=np.array(truncated, dtype=bool),
    )


def load_voc(
    root: str | Path,
    split: str,
    classes: list[str] | tuple[str, ...] = VOC_CLASSES,
    year: int | str | None = 2007,
    unknown_classes: str = "error",
    max_images: int | None = None,
) -> tuple[list[ImageRecord], LoadStats]:
    """All records of one split, with the counts of what was skipped or clipped."""
    if unknown_classes not in ("error", "skip"):
        raise ValueError(f"data.unknown_classes must be 'error' or 'skip', not {unknown_classes!r}")
    if len(set(classes)) != len(classes) or "__background__" in classes:
        raise ValueError(f"data.classes must be unique class names, got {list(classes)}")
    voc_dir = find_voc_dir(root, year)
    ids = read_split_ids(voc_dir, split)
    if max_images is not None:
        ids = ids[: int(max_images)]
    class_index = {name: i + 1 for i, name in enumerate(classes)}  # 0 is background
    stats = LoadStats()
    records = []
    for image_id in ids:
        image_path = voc_dir / "JPEGImages" / f"{image_id}.jpg"
        if not image_path.is_file():
            matches = sorted((voc_dir / "JPEGImages").glob(f"{image_id}.*"))
            if not matches:
                raise DatasetError(f"{image_path}: image file not found (listed in split {split!r})")
            image_path = matches[0]
        xml_path = voc_dir / "Annotations" / f"{image_id}.xml"
        records.append(parse_annotation(xml_path, image_path, class_index, unknown_classes, stats))
    stats.images = len(records)
    return records, stats


def load_split(data_cfg, split: str) -> list[ImageRecord]:
    """Records of ``split`` using the ``data`` config group (or its ``DataSettings``); logs what was
    skipped or clipped."""
    data_cfg = DataSettings.of(data_cfg)
    records, stats = load_voc(
        data_cfg.root, split, list(data_cfg.classes), data_cfg.year, data_cfg.unknown_classes, data_cfg.max_images,
    )
    if stats.unknown_class:
        log.warning("%s/%s: skipped %d objects of classes not in data.classes: %s", data_cfg.root, split,
                    sum(stats.unknown_class.values()), dict(stats.unknown_class))
    if stats.empty_boxes:
        log.warning("%s/%s: skipped %d boxes of zero or negative size", data_cfg.root, split, stats.empty_boxes)
    if stats.clipped_boxes:
        log.warning("%s/%s: clipped %d boxes that left the image", data_cfg.root, split, stats.clipped_boxes)
    log.info("%s/%s: %d images, %d objects", data_cfg.root, split, stats.images, stats.objects)
    return records


def check_splits(data_cfg, training: bool = True) -> None:
    """Refuse, before any work, an empty split and an image in two of the train / val / test splits
    (training on test images inflates every later score, silently). Reads only the split files.

    ``training``: the stage trains, so the train (and val) split files must exist; otherwise
    (eval) the test split must, and the others are compared when the dataset has them.
    ``data.allow_split_overlap=true`` allows the overlap; an empty split is always an error.
    """
    data_cfg = DataSettings.of(data_cfg)
    voc_dir = find_voc_dir(data_cfg.root, data_cfg.year)
    splits = {"train": data_cfg.train_split, "val": data_cfg.val_split, "test": data_cfg.test_split}
    needed = ("train", "val") if training else ("test",)
    max_images = data_cfg.max_images
    ids: dict[str, list[str]] = {}
    for role, split in splits.items():
        split_file = voc_dir / "ImageSets" / "Main" / f"{split}.txt"
        if not split or (role not in needed and not split_file.is_file()):
            continue
        ids[role] = read_split_ids(voc_dir, split)[: None if max_images is None else int(max_images)]
        if not ids[role]:
            raise DatasetError(f"{split_file}: split {split!r} (data.{role}_split) lists no images")
    if data_cfg.allow_split_overlap:
        return
    roles = list(ids)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            shared = sorted(set(ids[a]) & set(ids[b]))
            if shared:
                raise DatasetError(
                    f"{voc_dir}: data.{a}_split={splits[a]} and data.{b}_split={splits[b]} share {len(shared)} "
                    f"images (e.g. {', '.join(shared[:3])}): scores on {b} images that were trained on mean "
                    "nothing. Use disjoint split files, or data.allow_split_overlap=true if you mean it")


def train_val_split(data_cfg) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and validation records: ``data.val_split`` when set, else a fixed held-out
    fraction of ``data.train_split`` (every k-th image), never the test split."""
    data_cfg = DataSettings.of(data_cfg)
    train = load_split(data_cfg, data_cfg.train_split)
    if data_cfg.val_split:
        return train, load_split(data_cfg, data_cfg.val_split)
    k = max(2, round(1 / max(float(data_cfg.val_fraction), 1e-6)))
    return [r for i, r in enumerate(train) if i % k], [r for i, r in enumerate(train) if i % k == 0]
