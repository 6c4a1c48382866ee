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

import defusedxml.ElementTree as SafeET
import numpy as np
from defusedxml import DefusedXmlException

from spp_det.boxes import clip_boxes, flip_boxes, voc_to_internal
from spp_det.data.images import QUARTER_TURNS, ImageError, image_size, read_image
from spp_det.errors import UserError
from spp_det.settings import UNKNOWN_CLASSES, DataSettings

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
    """What the loader skipped or changed, by kind, so the user sees counts, not silence.

    ``repairs``: one line per skipped or clipped box (and per ``<size>`` taken from the image),
    naming the file, the object, the field and its value; ``size_from_image``: annotations
    without a usable ``<size>``; ``oriented``: images by EXIF orientation other than 1."""

    images: int = 0
    objects: int = 0
    unknown_class: Counter = dataclasses.field(default_factory=Counter)
    empty_boxes: int = 0
    clipped_boxes: int = 0
    size_from_image: int = 0
    oriented: Counter = dataclasses.field(default_factory=Counter)
    repairs: list = dataclasses.field(default_factory=list)


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


# A VOC annotation is about 0.3 KB per object: 32 MiB is some 100,000 objects. A larger file is not an
# annotation (or is built to exhaust memory); refused before parsing. Not a setting: no real file comes near.
MAX_ANNOTATION_BYTES = 32 << 20


def _child(node: ET.Element, tag: str, where: str, xml_path: Path, required: bool = True) -> ET.Element | None:
    """The one ``<tag>`` child of ``node``; an error naming the file when it is missing (``required``)
    or given twice (which of two values is meant cannot be guessed)."""
    found = node.findall(tag)
    if len(found) > 1:
        raise DatasetError(f"{xml_path}: malformed annotation: {where} has {len(found)} <{tag}> tags")
    if not found and required:
        raise DatasetError(f"{xml_path}: malformed annotation: {where} has no <{tag}>")
    return found[0] if found else None


def _text(node: ET.Element, tag: str, where: str, xml_path: Path, required: bool = True) -> str | None:
    """The stripped text of the one ``<tag>`` child; None when it is absent or empty and not ``required``."""
    child = _child(node, tag, where, xml_path, required)
    text = None if child is None or child.text is None else child.text.strip()
    if not text and required:
        raise DatasetError(f"{xml_path}: malformed annotation: {where} has an empty <{tag}>")
    return text or None


def _number(node: ET.Element, tag: str, where: str, xml_path: Path) -> float:
    """``<tag>`` as a finite number (NaN and infinity are errors: no box or size can hold them)."""
    value = _text(node, tag, where, xml_path)
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not np.isfinite(number):
        raise DatasetError(f"{xml_path}: malformed annotation: {where}: <{tag}> is {value!r}, not a finite number")
    return number


def _flag(obj: ET.Element, tag: str, where: str, xml_path: Path) -> bool:
    """``<difficult>`` / ``<truncated>``: 0 or 1 as VOC writes them (absent or empty: 0). Anything else
    (``yes``, ``2``) is an error: guessing could turn a difficult object into a positive."""
    value = _text(obj, tag, where, xml_path, required=False)
    if value not in (None, "0", "1"):
        raise DatasetError(f"{xml_path}: malformed annotation: {where}: <{tag}> is {value!r}, expected 0 or 1")
    return value == "1"


def _image_size(tree: ET.Element, xml_path: Path, image_path: Path, stats: LoadStats) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed (EXIF orientation applied, as ``read_image`` and
    ``spp-det detect`` show it): boxes are read in those pixels. ``<size>`` must agree with the image;
    without one (or with 0 x 0, as some tools write) the image header gives it, counted in ``stats``."""
    size = _child(tree, "size", "<annotation>", xml_path, required=False)
    try:
        shown_w, shown_h, orientation = image_size(image_path)
    except ImageError as exc:
        if size is None:
            raise DatasetError(f"{xml_path}: no <size>, and the image cannot tell it: {exc}") from None
        shown_w = shown_h = orientation = None  # reported with the other unreadable images when it is read
    if orientation not in (1, None):
        stats.oriented[orientation] += 1
    if size is None:  # some VOC-layout datasets omit <size>
        stats.size_from_image += 1
        return shown_w, shown_h
    width, height = (_number(size, tag, "<size>", xml_path) for tag in ("width", "height"))
    if width != int(width) or height != int(height) or width < 0 or height < 0 or (width == 0) != (height == 0):
        raise DatasetError(f"{xml_path}: malformed annotation: <size> is {width:g} x {height:g}, not an image size")
    width, height = int(width), int(height)
    if orientation is None and width > 0:
        return width, height
    if orientation is None:
        raise DatasetError(f"{xml_path}: <size> is 0 x 0, and the image {image_path} cannot tell it")
    if width == height == 0:
        stats.size_from_image += 1
        stats.repairs.append(f"{xml_path}: <size> is 0 x 0; the image's {shown_w} x {shown_h} is used")
        return shown_w, shown_h
    if (width, height) == (shown_w, shown_h):
        return width, height
    if orientation in QUARTER_TURNS and (width, height) == (shown_h, shown_w):
        raise DatasetError(
            f"{xml_path}: <size> {width} x {height} is the stored size of {image_path}, which its EXIF orientation "
            f"{orientation} turns to {shown_w} x {shown_h} when shown: boxes are read in the pixels as displayed (as "
            "spp-det detect reports them), so these were drawn on the unturned pixels. Annotate the displayed image, or "
            "remove the image's orientation tag (e.g. exiftool -Orientation=1 -n) if the boxes fit the stored pixels")
    turned = f", EXIF orientation {orientation} applied" if orientation != 1 else ""
    raise DatasetError(f"{xml_path}: <size> {width} x {height} disagrees with the image {image_path} "
                       f"({shown_w} x {shown_h}{turned}): its boxes may be in another image's pixels; "
                       "correct <size>, or the image")


def _object_box(obj: ET.Element, where: str, xml_path: Path, width: int, height: int,
                stats: LoadStats) -> np.ndarray | None:
    """The object's ``<bndbox>`` as an internal box ``float32 [4]``; coordinates outside the image
    are clipped to it, each clipped or skipped box counted in ``stats`` with a line naming the file,
    the object, the field and its value; None (skipped) when the box has no width or height, or lies
    outside the image."""
    bndbox = _child(obj, "bndbox", where, xml_path)
    xmin, ymin, xmax, ymax = voc = [_number(bndbox, t, f"{where} <bndbox>", xml_path)
                                    for t in ("xmin", "ymin", "xmax", "ymax")]
    box = voc_to_internal(np.array(voc))[0]

    def skip(reason: str) -> None:
        stats.empty_boxes += 1
        stats.repairs.append(f"{xml_path}: {where}: {reason}; skipped")

    if box[2] <= box[0] or box[3] <= box[1]:  # in VOC's inclusive pixels a box needs xmax >= xmin
        axis = ("width", "xmax", xmax, "xmin", xmin) if box[2] <= box[0] else ("height", "ymax", ymax, "ymin", ymin)
        return skip("the box has no %s (%s %g < %s %g)" % axis)
    if box[0] >= width or box[1] >= height or box[2] <= 0 or box[3] <= 0:
        side = next(text for out, text in ((box[0] >= width, f"xmin {xmin:g} > width {width}"),
                                           (box[1] >= height, f"ymin {ymin:g} > height {height}"),
                                           (box[2] <= 0, f"xmax {xmax:g} < 1"), (box[3] <= 0, f"ymax {ymax:g} < 1"))
                    if out)
        return skip(f"the box lies outside the {width} x {height} image ({side})")
    outside = [text for out, text in ((xmin < 1, f"xmin {xmin:g} < 1"), (ymin < 1, f"ymin {ymin:g} < 1"),
                                      (xmax > width, f"xmax {xmax:g} > width {width}"),
                                      (ymax > height, f"ymax {ymax:g} > height {height}")) if out]
    if outside:
        stats.clipped_boxes += 1
        stats.repairs.append(f"{xml_path}: {where}: {', '.join(outside)}; clipped to the {width} x {height} image")
    return clip_boxes(box, width, height)[0]


def _read_xml(xml_path: Path) -> ET.Element:
    """The root ``<annotation>`` element, parsed by defusedxml: a file that declares entities or
    external references is refused (annotations come from third parties; the standard library's
    parser would expand them: memory blow-up, or reading other files)."""
    if not xml_path.is_file():
        raise DatasetError(f"{xml_path}: annotation file not found")
    size = xml_path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise DatasetError(f"{xml_path}: {size:,} bytes, over the {MAX_ANNOTATION_BYTES >> 20} MiB an annotation may "
                           "have (a VOC annotation is about 0.3 KB per object): not an annotation file?")
    try:
        root = SafeET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: malformed XML: {exc}") from None
    except DefusedXmlException as exc:
        raise DatasetError(f"{xml_path}: refused: the XML declares entities or external references ({exc}); "
                           "VOC annotations have none") from None
    except (ValueError, LookupError, OSError, RecursionError) as exc:  # an unknown encoding, an unreadable file
        raise DatasetError(f"{xml_path}: cannot read the XML ({type(exc).__name__}: {exc})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{xml_path}: malformed annotation: the root element is <{root.tag}>, not <annotation>")
    return root


def parse_annotation(
    xml_path: Path,
    image_path: Path,
    class_index: dict[str, int],
    unknown_classes: str,
    stats: LoadStats,
) -> ImageRecord:
    """One VOC XML file -> ``ImageRecord`` in the pixels of ``image_path`` as displayed. Every problem is
    a ``DatasetError`` naming the file and the tag, or a repair counted in ``stats`` with a line in
    ``stats.repairs`` (docs/dataset.md, "Your own dataset in VOC layout")."""
    tree = _read_xml(xml_path)
    width, height = _image_size(tree, xml_path, image_path, stats)

    boxes, labels, difficult, truncated = [], [], [], []
    for i, obj in enumerate(tree.findall("object")):
        name = _text(obj, "name", f"object {i}", xml_path)
        if name not in class_index:
            if unknown_classes == "skip":
                stats.unknown_class[name] += 1
                continue
            raise DatasetError(
                f"{xml_path}: object {i}: <name> {name!r} is not in data.classes "
                f"({', '.join(class_index)}); add it, or set data.unknown_classes=skip"
            )
        where = f"object {i} ({name})"
        flags = [_flag(obj, tag, where, xml_path) for tag in ("difficult", "truncated")]
        box = _object_box(obj, where, xml_path, width, height, stats)
        if box is None:
            continue
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(flags[0])
        truncated.append(flags[1])
    stats.objects += len(boxes)
    return ImageRecord(
        image_id=xml_path.stem,
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
    if unknown_classes not in UNKNOWN_CLASSES:
        raise ValueError(f"data.unknown_classes must be {' or '.join(map(repr, UNKNOWN_CLASSES))}, not {unknown_classes!r}")
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


# repairs named one by one in the log (all of them are in LoadStats.repairs); the rest are counted
SHOWN_REPAIRS = 10


def load_split(data_cfg: DataSettings, split: str) -> list[ImageRecord]:
    """Records of ``split`` using the ``data`` settings; logs what was skipped or clipped."""
    records, stats = load_voc(
        data_cfg.root, split, list(data_cfg.classes), data_cfg.year, data_cfg.unknown_classes, data_cfg.max_images,
    )
    if stats.unknown_class:
        log.warning("%s/%s: skipped %d objects of classes not in data.classes: %s", data_cfg.root, split,
                    sum(stats.unknown_class.values()), dict(stats.unknown_class))
    for line in stats.repairs[:SHOWN_REPAIRS]:
        log.warning("%s", line)
    if stats.empty_boxes or stats.clipped_boxes:
        more = f" (the first {SHOWN_REPAIRS} named above)" if len(stats.repairs) > SHOWN_REPAIRS else ""
        log.warning("%s/%s: skipped %d boxes without width or height or outside the image, clipped %d that left "
                    "it%s", data_cfg.root, split, stats.empty_boxes, stats.clipped_boxes, more)
    turned = sum(n for o, n in stats.oriented.items() if o not in QUARTER_TURNS)
    if turned:  # a half turn or mirror keeps the size, so <size> cannot tell which pixels the boxes were drawn on
        log.warning("%s/%s: %d images carry an EXIF orientation that mirrors or turns them by half: their boxes are "
                    "read in the pixels as displayed (as spp-det detect reports them)", data_cfg.root, split, turned)
    log.info("%s/%s: %d images, %d objects", data_cfg.root, split, stats.images, stats.objects)
    return records


def check_splits(data_cfg: DataSettings, training: bool = True) -> None:
    """Refuse, before any work, an empty split and an image in two of the train / val / test splits
    (training on test images inflates every later score, silently). Reads only the split files.

    ``training``: the stage trains, so the train (and val) split files must exist; otherwise
    (eval) the test split must, and the others are compared when the dataset has them.
    ``data.allow_split_overlap=true`` allows the overlap; an empty split is always an error.
    """
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


def train_val_split(data_cfg: DataSettings) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and validation records: ``data.val_split`` when set, else a fixed held-out
    fraction of ``data.train_split`` (every k-th image), never the test split."""
    train = load_split(data_cfg, data_cfg.train_split)
    if data_cfg.val_split:
        return train, load_split(data_cfg, data_cfg.val_split)
    k = max(2, round(1 / max(float(data_cfg.val_fraction), 1e-6)))
    return [r for i, r in enumerate(train) if i % k], [r for i, r in enumerate(train) if i % k == 0]
