"""Seeded fuzz of the VOC annotation reader (issue 30): mutated annotation files (tags dropped or
doubled, values swapped for other types, NaN, out-of-range and inverted boxes, ``<difficult>yes``,
a ``<size>`` that disagrees with the image, DTD entities, junk bytes, truncation, odd encodings,
many objects). Every case must end in a ``DatasetError`` naming the file and the tag (or what of the
XML), or in a record whose every box is the file's own value, except those named in
``LoadStats.repairs`` (clipped or skipped, counted); never another exception, never a box changed
or an object dropped without a line saying so.

The oracle reads each accepted file again with the standard library's parser (the reader accepted
it, so it declares no entities) and rebuilds the expected record from the file and the repair lines.
"""
from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spp_det.data.voc import MAX_ANNOTATION_BYTES, DatasetError, LoadStats, parse_annotation

CLASSES = ["cat", "dog"]
W, H = 64, 48
VALUES = ["nan", "NaN", "inf", "-inf", "1e999", "-5", "0", "1e9", "", "  ", "abc", "yes", "true", "0x10", "1,5",
          " 12 ", "12.5", "-0", "3\u0663", "1_0", "\u00e9", "64", "48", "65", "49", "None", "[1]", "1 2"]


def base_annotation(rng: np.random.Generator) -> ET.Element:
    """A valid annotation of a W x H image with 1-4 objects inside it (VOC 1-based inclusive pixels)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = "img.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", W), ("height", H), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for _ in range(int(rng.integers(1, 5))):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = str(rng.choice(CLASSES))
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(rng.integers(0, 2)))
        ET.SubElement(obj, "difficult").text = str(int(rng.integers(0, 2)))
        box = ET.SubElement(obj, "bndbox")
        x1, x2 = sorted(rng.integers(1, W + 1, size=2).tolist())
        y1, y2 = sorted(rng.integers(1, H + 1, size=2).tolist())
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(box, tag).text = str(value)
    return root


def elements(root: ET.Element) -> list[tuple[ET.Element, ET.Element]]:
    """(parent, child) of every element below the root."""
    return [(parent, child) for parent in root.iter() for child in parent]


def pick(rng, items):
    return items[int(rng.integers(len(items)))] if items else None


def coords(root) -> list[ET.Element]:
    return [c for obj in root.iter("object") for b in obj.iter("bndbox") for c in b]


# tree mutations: (name, function(rng, root))
def drop_tag(rng, root):
    parent, child = pick(rng, elements(root))
    parent.remove(child)


def double_tag(rng, root):
    parent, child = pick(rng, elements(root))
    parent.append(copy.deepcopy(child))


def other_value(rng, root):
    leaves = [c for _, c in elements(root) if len(c) == 0]
    pick(rng, leaves).text = str(rng.choice(VALUES))


def inverted_box(rng, root):
    box = pick(rng, list(root.iter("bndbox")))
    if box is not None:
        a, b = ("xmin", "xmax") if rng.random() < 0.5 else ("ymin", "ymax")
        box.find(a).text, box.find(b).text = box.find(b).text, str(int(box.find(a).text) + int(rng.integers(0, 3)))


def out_of_image(rng, root):
    c = pick(rng, coords(root))
    if c is not None:
        c.text = str(rng.choice([-100, -5, 0, W + 1, H + 1, 10 * W, 10 ** 7, -1e-3, W + 0.5]))


def flag_value(rng, root):
    obj = pick(rng, list(root.iter("object")))
    if obj is not None:
        tag = str(rng.choice(["difficult", "truncated"]))
        (obj.find(tag) if obj.find(tag) is not None else ET.SubElement(obj, tag)).text = str(
            rng.choice(["yes", "no", "true", "False", "2", "-1", " 1 ", "", "01", "1.0"]))


def size_value(rng, root):
    size = root.find("size")
    if size is not None:
        w, h = rng.choice([(0, 0), (H, W), (W + 1, H), (W, 0), (-W, H), (W * 2, H * 2), (64.0, 48.0), (64.5, 48)])
        for tag, value in (("width", w), ("height", h)):
            if size.find(tag) is not None:
                size.find(tag).text = str(value)


def rename(rng, root):
    target = root if rng.random() < 0.5 else pick(rng, [c for _, c in elements(root)])
    target.tag = str(rng.choice(["Annotation", "annotations", "objet", "size", "{urn:x}annotation", "xmin"]))


def class_name(rng, root):
    obj = pick(rng, list(root.iter("object")))
    if obj is not None and obj.find("name") is not None:
        obj.find("name").text = str(rng.choice(["Cat", " dog ", "bird", "ca\u0301t", "\u732b", "cat\x7f"]))


def deep(rng, root):
    node = pick(rng, list(root.iter("object"))) or root
    for _ in range(int(rng.integers(50, 300))):
        node = ET.SubElement(node, "part")


def many_objects(rng, root):
    objects = list(root.iter("object"))
    for _ in range(int(rng.integers(100, 600))):
        root.append(copy.deepcopy(pick(rng, objects) or ET.Element("object")))


TREE = [drop_tag, double_tag, other_value, inverted_box, out_of_image, flag_value, size_value, rename, class_name,
        deep, many_objects]


# byte mutations of the serialised file: (rng, data) -> data
def junk(rng, data):
    at = int(rng.integers(len(data) + 1))
    return data[:at] + rng.integers(0, 256, size=int(rng.integers(1, 12)), dtype=np.uint8).tobytes() + data[at:]


def truncate(rng, data):
    return data[: int(rng.integers(len(data)))]


def flip_bytes(rng, data):
    out = bytearray(data)
    for i in rng.integers(0, len(out), size=int(rng.integers(1, 6))):
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def encoding(rng, data):
    text = data.decode("utf-8", errors="replace")
    kind = int(rng.integers(6))
    if kind == 0:
        return ('<?xml version="1.0" encoding="UTF-16"?>' + text).encode("utf-16")
    if kind == 1:
        return ('<?xml version="1.0" encoding="ISO-8859-1"?>' + text.replace("Unspecified", "\u00e9t\u00e9")).encode(
            "latin-1", errors="replace")
    if kind == 2:  # declared UTF-16, written as UTF-8
        return b'<?xml version="1.0" encoding="UTF-16"?>' + data
    if kind == 3:
        return b'<?xml version="1.0" encoding="klingon"?>' + data
    if kind == 4:
        return b"\xef\xbb\xbf" + data  # UTF-8 byte order mark
    return text.replace("Unspecified", "\u00e9t\u00e9").encode("latin-1", errors="replace")  # Latin-1 without saying


def entities(rng, data):
    kind = int(rng.integers(4))
    body = data.decode("utf-8", errors="replace")
    if kind == 0:  # an entity that expands to a class name
        return ('<!DOCTYPE annotation [<!ENTITY c "cat">]>' + body.replace(">cat<", ">&c;<", 1)).encode()
    if kind == 1:  # billion laughs, small
        lol = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10 if i else "lol"}">' for i in range(6))
        return (f"<!DOCTYPE annotation [{lol}]>" + body.replace("Unspecified", "&l5;", 1)).encode()
    if kind == 2:  # an external entity: would read another file
        return ('<!DOCTYPE annotation [<!ENTITY x SYSTEM "file:///etc/hostname">]>'
                + body.replace("Unspecified", "&x;", 1)).encode()
    return ('<!DOCTYPE annotation SYSTEM "http://example.invalid/voc.dtd">' + body).encode()  # a DTD, no entity


BYTES = [junk, truncate, flip_bytes, encoding, entities]


def mutated(rng) -> tuple[bytes, str]:
    """A mutated annotation and the names of its mutations."""
    root, names = base_annotation(rng), []
    for _ in range(int(rng.integers(1, 4))):
        mutation = pick(rng, TREE)
        try:
            mutation(rng, root)
        except (TypeError, AttributeError, ValueError):  # nothing there to mutate
            continue
        names.append(mutation.__name__)
    data = ET.tostring(root)
    if rng.random() < 0.4:
        mutation = pick(rng, BYTES)
        data = mutation(rng, data)
        names.append(mutation.__name__)
    return data, "+".join(names) or "none"


def expected_record(data: bytes, stats: LoadStats, unknown: str):
    """Boxes, difficult flags and the count of unknown-class objects the reader must give for an
    accepted file: each object's own box, clipped or left out only where a repair line names it."""
    root = ET.fromstring(data)
    repairs = {int(m.group(1)): line for line in stats.repairs for m in [re.search(r": object (\d+) \(", line)] if m}
    boxes, difficult, unknown_objects = [], [], 0
    for i, obj in enumerate(root.findall("object")):
        if obj.findtext("name").strip() not in CLASSES:
            assert unknown == "skip"
            unknown_objects += 1
            continue
        b = obj.find("bndbox")
        box = np.array([float(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]) - [1, 1, 0, 0]
        line = repairs.get(i)
        if line is not None and line.endswith("skipped"):
            continue
        if line is not None:
            assert "clipped to" in line, line
            box = np.clip(box, 0, [W, H, W, H])
        boxes.append(box)
        difficult.append((obj.findtext("difficult") or "").strip() == "1")
    return np.array(boxes, np.float32).reshape(-1, 4), difficult, unknown_objects


def error_kind(message: str) -> str:
    for key in ("malformed XML", "declares entities", "cannot read the XML", "not a finite number", "expected 0 or 1",
                "not in data.classes", "root element", "disagrees with the image", "not an image size", "has no <",
                "an empty <", "tags", "bytes, over"):
        if key in message:
            return key
    return "other: " + message


def run_case(tmp_path: Path, image: Path, n: int, data: bytes, unknown: str) -> str:
    """Read one mutated file; returns its outcome kind (asserting the contract)."""
    xml = tmp_path / f"case{n}.xml"
    xml.write_bytes(data)
    stats = LoadStats()
    try:
        record = parse_annotation(xml, image, {c: i + 1 for i, c in enumerate(CLASSES)}, unknown, stats)
    except DatasetError as exc:
        message = str(exc)
        assert message.startswith(f"{xml}: "), message  # names the file
        assert re.search(r"<[\w{}:]+>|XML|bytes", message), message  # and the tag, or what of the XML
        return "error: " + error_kind(message)
    boxes, difficult, unknown_objects = expected_record(data, stats, unknown)
    assert (record.width, record.height) == (W, H)
    assert np.array_equal(record.boxes, boxes), (record.boxes, boxes, stats.repairs)
    assert record.difficult.tolist() == difficult
    assert sum(stats.unknown_class.values()) == unknown_objects
    assert np.isfinite(record.boxes).all() and (record.boxes[:, 2:] > record.boxes[:, :2]).all()
    assert len(stats.repairs) == stats.clipped_boxes + stats.empty_boxes + ("<size> is 0 x 0" in "".join(stats.repairs))
    return "accepted, repaired" if stats.repairs else "accepted"


def fuzz(tmp_path: Path, cases: int, seed: int) -> Counter:
    image = tmp_path / "img.jpg"
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(image)
    rng, outcomes = np.random.default_rng(seed), Counter()
    for n in range(cases):
        data, names = mutated(rng)
        unknown = "skip" if rng.random() < 0.3 else "error"
        try:
            outcomes[run_case(tmp_path, image, n, data, unknown)] += 1
        except AssertionError as exc:
            raise AssertionError(f"case {n} ({names}, unknown_classes={unknown}): {exc}\n{data[:600]!r}") from None
    print(f"\n{cases} fuzz cases (seed {seed}):", dict(sorted(outcomes.items())))
    return outcomes


def test_fuzzed_annotations_are_clear_errors_or_counted_repairs(tmp_path):
    outcomes = fuzz(tmp_path, 400, seed=30)
    # the generator reaches the reader's paths: clean, repaired and many kinds of error
    assert outcomes["accepted"] and outcomes["accepted, repaired"]
    assert len([k for k in outcomes if k.startswith("error")]) >= 10, outcomes
    assert not [k for k in outcomes if "other:" in k], outcomes


@pytest.mark.slow
def test_fuzzed_annotations_thousands(tmp_path):
    outcomes = fuzz(tmp_path, 5000, seed=2030)
    assert not [k for k in outcomes if "other:" in k], outcomes


def write_case(tmp_path: Path, xml: str, size=(W, H)) -> tuple[Path, Path]:
    image = tmp_path / "img.jpg"
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(image)
    path = tmp_path / "a.xml"
    path.write_text(xml)
    return path, image


def annotation(*objects: str, size: str = f"<size><width>{W}</width><height>{H}</height></size>") -> str:
    return f"<annotation>{size}{''.join(objects)}</annotation>"


def obj(box, name="cat", extra="") -> str:
    return (f"<object><name>{name}</name>{extra}<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in
            zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox></object>")


def read(path, image, stats=None):
    return parse_annotation(path, image, {"cat": 1}, "error", stats if stats is not None else LoadStats())


@pytest.mark.parametrize("xml, message", [
    (annotation(obj(("nan", 1, 10, 10))), r"object 0 \(cat\) <bndbox>: <xmin> is 'nan', not a finite number"),
    (annotation(obj((1, 1, "inf", 10))), "<xmax> is 'inf', not a finite number"),
    (annotation(obj((1, 1, 10, 10), extra="<difficult>yes</difficult>")), "<difficult> is 'yes', expected 0 or 1"),
    (annotation(obj((1, 1, 10, 10)), size="<size><width>65</width><height>48</height></size>"),
     "<size> 65 x 48 disagrees with the image .*img.jpg \\(64 x 48\\)"),
    (annotation(obj((1, 1, 10, 10)), size="<size><width>64.5</width><height>48</height></size>"), "not an image size"),
    ('<!DOCTYPE annotation [<!ENTITY c "cat">]>' + annotation(obj((1, 1, 10, 10), name="&c;")),
     "refused: the XML declares entities"),
    (annotation(obj((1, 1, 10, 10)) + obj((1, 1, 10, 10)).replace("<xmin>1</xmin>", "<xmin>1</xmin><xmin>2</xmin>")),
     "object 1 \\(cat\\) <bndbox> has 2 <xmin> tags"),
    ("<annotations>" + obj((1, 1, 10, 10)) + "</annotations>", "root element is <annotations>, not <annotation>"),
])
def test_each_hostile_value_is_an_error_naming_file_and_tag(tmp_path, xml, message):
    path, image = write_case(tmp_path, xml)
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: .*{message}"):
        read(path, image)


def test_out_of_image_and_inverted_boxes_are_named_with_their_values(tmp_path):
    path, image = write_case(tmp_path, annotation(
        obj((70, 2, 80, 10)),     # beyond the right edge: skipped
        obj((10, 10, 5, 20)),     # xmax < xmin: skipped
        obj((1, -5, 900, 20)),    # negative ymin, xmax far beyond: clipped
        obj((2, 3, 10, 12)),      # fine
    ))
    stats = LoadStats()
    record = read(path, image, stats)
    assert stats.repairs == [
        f"{path}: object 0 (cat): the box lies outside the 64 x 48 image (xmin 70 > width 64); skipped",
        f"{path}: object 1 (cat): the box has no width (xmax 5 < xmin 10); skipped",
        f"{path}: object 2 (cat): ymin -5 < 1, xmax 900 > width 64; clipped to the 64 x 48 image",
    ]
    assert (stats.empty_boxes, stats.clipped_boxes) == (2, 1)
    assert record.boxes.tolist() == [[0, 0, 64, 20], [1, 2, 10, 12]]


def test_size_missing_or_zero_comes_from_the_image_and_is_counted(tmp_path):
    path, image = write_case(tmp_path, annotation(obj((1, 1, 10, 10)), size="<size><width>0</width><height>0</height>"
                                                                             "</size>"), size=(80, 60))
    stats = LoadStats()
    assert (read(path, image, stats).width, stats.size_from_image) == (80, 1)
    assert stats.repairs == [f"{path}: <size> is 0 x 0; the image's 80 x 60 is used"]


def test_an_oversized_annotation_is_refused_before_parsing(tmp_path):
    path, image = write_case(tmp_path, annotation())
    with open(path, "ab") as f:
        f.truncate(MAX_ANNOTATION_BYTES + 1)
    with pytest.raises(DatasetError, match="bytes, over the 32 MiB an annotation may have"):
        read(path, image)
