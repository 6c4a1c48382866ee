"""VOC data layer: the box convention, the real sample, and every bad-input case of issue 2."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from spp_det.boxes import box_iou, flip_boxes, internal_to_voc, voc_to_internal
from spp_det.data.images import ImageError, read_image
from spp_det.config import compose_config
from spp_det.settings import DataSettings
from spp_det.data.voc import VOC_CLASSES, DatasetError, load_split, load_voc
from tests.conftest import write_voc


def test_voc_box_converts_to_internal_and_back():
    voc = np.array([[1, 1, 10, 20]])  # VOC: 1-based inclusive, a 10 x 20 pixel box
    internal = voc_to_internal(voc)
    assert internal.tolist() == [[0, 0, 10, 20]]
    assert (internal[0, 2] - internal[0, 0], internal[0, 3] - internal[0, 1]) == (10, 20)
    assert internal_to_voc(internal).tolist() == voc.tolist()


def test_continuous_iou_equals_devkit_inclusive_iou():
    a, b = np.array([[1, 1, 10, 10]]), np.array([[5, 5, 14, 14]])  # VOC boxes

    def devkit_iou(p, q):  # VOCevaldet.m with its "+1"
        iw = min(p[2], q[2]) - max(p[0], q[0]) + 1
        ih = min(p[3], q[3]) - max(p[1], q[1]) + 1
        inter = iw * ih
        return inter / ((p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - inter)

    assert box_iou(voc_to_internal(a), voc_to_internal(b))[0, 0] == pytest.approx(devkit_iou(a[0], b[0]))


def test_flip_twice_is_identity_and_mirrors_x():
    boxes = np.array([[2, 3, 10, 8]], np.float32)
    assert flip_boxes(boxes, 20).tolist() == [[10, 3, 18, 8]]
    assert flip_boxes(flip_boxes(boxes, 20), 20).tolist() == boxes.tolist()


def test_real_voc_sample_counts(voc_sample):
    records, stats = load_voc(voc_sample, "all", VOC_CLASSES, year=2012)
    assert len(records) == 100
    assert sum(len(r.boxes) for r in records) == 273
    assert sum(int(r.difficult.sum()) for r in records) == 38
    assert set(np.concatenate([r.labels for r in records]).tolist()) == set(range(1, 21))
    assert stats.empty_boxes == 0 and not stats.unknown_class
    r = records[0]
    assert r.image_id == "2007_000027" and (r.width, r.height) == (486, 500)
    image = r.load_image()
    assert image.shape == (500, 486, 3) and image.dtype == np.uint8
    # the loader's boxes are 0-based: VOC xmin 174 -> 173
    assert r.boxes[0, 0] == 173 and np.all(r.boxes[:, 2] <= r.width) and np.all(r.boxes[:, 3] <= r.height)


def test_flipped_record_loads_mirrored_pixels(voc_sample):
    records, _ = load_voc(voc_sample, "all", VOC_CLASSES, year=2012, max_images=1)
    r = records[0]
    assert np.array_equal(r.flip().load_image(), r.load_image()[:, ::-1])
    assert r.flip().key == r.image_id + "_flip"


def test_devkit_root_and_voc_folder_both_load(voc_sample):
    a, _ = load_voc(voc_sample, "all", VOC_CLASSES, year=2012, max_images=3)
    b, _ = load_voc(voc_sample / "VOC2012", "all", VOC_CLASSES, year=None, max_images=3)
    assert [r.image_id for r in a] == [r.image_id for r in b]


def test_custom_classes_and_unknown_class_error_or_skip(tmp_path):
    root = write_voc(tmp_path, {"a": {"objects": [("cat", (1, 1, 10, 10), 0), ("dog", (5, 5, 20, 20), 0)]}})
    with pytest.raises(DatasetError, match=r"a\.xml.*'dog'.*not in data.classes"):
        load_voc(root, "train", ["cat"])
    records, stats = load_voc(root, "train", ["cat"], unknown_classes="skip")
    assert records[0].labels.tolist() == [1] and stats.unknown_class == {"dog": 1}


def test_missing_split_annotation_and_image_are_named(tmp_path):
    root = write_voc(tmp_path, {"a": {"objects": []}, "b": {"xml": None}})
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        load_voc(root, "train_typo".replace("train_typo", "val"), ["cat"])
    with pytest.raises(DatasetError, match=r"b\.xml: annotation file not found"):
        load_voc(root, "train", ["cat"])
    root2 = write_voc(tmp_path / "r2", {"c": {"no_image": True}})
    with pytest.raises(DatasetError, match=r"c\.jpg: image file not found"):
        load_voc(root2, "train", ["cat"])


def test_not_a_voc_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not a VOC dataset"):
        load_voc(tmp_path, "train", ["cat"])


@pytest.mark.parametrize("xml, problem", [
    ("<annotation><size>", "malformed XML"),
    ("<annotation><size><width>64</width><height>48</height></size><object><name>cat</name></object></annotation>", "has no <bndbox>"),
    ("<annotation><size><width>64</width><height>48</height></size><object><name>cat</name><bndbox><xmin>a</xmin>"
     "<ymin>1</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object></annotation>", "<xmin> is 'a', not a finite number"),
])
def test_malformed_xml_names_file_and_problem(tmp_path, xml, problem):
    root = write_voc(tmp_path, {"bad": {"xml": xml}})
    with pytest.raises(DatasetError, match=rf"bad\.xml: .*{problem}"):
        load_voc(root, "train", ["cat"])


def test_empty_box_skipped_with_warning_and_outside_box_clipped(tmp_path, caplog):
    root = write_voc(tmp_path, {"a": {"size": (64, 48), "objects": [
        ("cat", (10, 10, 8, 20), 0),     # xmax < xmin: skipped
        ("cat", (-5, 2, 80, 30), 0),     # leaves the image: clipped
        ("cat", (1, 1, 10, 10), 1),      # difficult
    ]}})
    with caplog.at_level(logging.WARNING):
        records = load_split(DataSettings.of(compose_config([f"data.root={root}", "data.year=null", "data.classes=[cat]"]).data),
                             "train")
    assert "a.xml: object 0 (cat): the box has no width (xmax 8 < xmin 10); skipped" in caplog.text
    assert "a.xml: object 1 (cat): xmin -5 < 1, xmax 80 > width 64; clipped to the 64 x 48 image" in caplog.text
    assert "skipped 1 boxes without width or height or outside the image, clipped 1 that left it" in caplog.text
    r = records[0]
    assert r.boxes.tolist() == [[0, 1, 64, 30], [0, 0, 10, 10]]
    assert r.difficult.tolist() == [False, True]


def test_image_without_objects_is_kept(tmp_path):
    records, _ = load_voc(write_voc(tmp_path, {"empty": {"objects": []}}), "train", ["cat"])
    assert records[0].boxes.shape == (0, 4) and records[0].labels.shape == (0,)


def test_read_image_converts_modes_and_rejects_bad_files(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 200, np.uint8), "L").save(gray)
    assert read_image(gray).shape == (5, 7, 3)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(rgba)  # fully transparent
    assert read_image(rgba)[0, 0].tolist() == [255, 255, 255]
    deep = tmp_path / "d.png"
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(deep)
    assert read_image(deep)[0, 0].tolist() == [255, 255, 255]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, reason in [("empty.jpg", "empty file"), ("text.jpg", "not a recognised image"), ("nope.jpg", "not found")]:
        with pytest.raises(ImageError, match=reason):
            read_image(tmp_path / name)
    with pytest.raises(ImageError, match="exceeds the limit"):
        read_image(gray, max_pixels=10)


# Pillow's transpose that exif_transpose applies for each EXIF orientation (the stored pixels are its inverse)
SHOWN_BY = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


def write_oriented(path, shown: np.ndarray, orientation: int) -> None:
    """A JPEG whose stored pixels, turned by its EXIF ``orientation``, show ``shown``."""
    image = Image.fromarray(shown)
    if orientation != 1:
        image = image.transpose(INVERSE.get(SHOWN_BY[orientation], SHOWN_BY[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_and_pixels_agree_for_exif_rotated_training_images(tmp_path, orientation):
    """Boxes are read in the pixels as displayed (EXIF orientation applied), as detect reports them: the
    record's size, its loaded pixels and its boxes agree, mirrored too, with or without <size>."""
    shown = np.full((80, 60, 3), 30, np.uint8)   # displayed: 60 wide, 80 high
    shown[10:30, 5:25] = (230, 20, 20)           # a red object at VOC (6, 11, 25, 30)
    obj = [("cat", (6, 11, 25, 30), 0)]
    root = write_voc(tmp_path, {"a": {"size": (60, 80), "objects": obj}, "b": {"size": (60, 80), "objects": obj}})
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<size><width>60</width><height>80</height><depth>3</depth></size>", ""))
    for name in ("a", "b"):  # b: no <size>, the image header gives it
        write_oriented(root / "JPEGImages" / f"{name}.jpg", shown, orientation)
    for record in load_voc(root, "train", ["cat"])[0]:
        assert (record.width, record.height) == (60, 80)
        for r in (record, record.flip()):
            pixels = r.load_image()
            assert pixels.shape == (r.height, r.width, 3)
            x1, y1, x2, y2 = r.boxes[0].astype(int)
            inside, outside = pixels[y1:y2, x1:x2].reshape(-1, 3).mean(0), pixels.reshape(-1, 3).mean(0)
            assert inside[0] > 200 and inside[1] < 60 and outside[0] < 120, (orientation, r.flipped, inside)


def test_size_of_the_unturned_pixels_is_an_error_that_says_so(tmp_path):
    shown = np.full((80, 60, 3), 30, np.uint8)
    root = write_voc(tmp_path, {"a": {"size": (80, 60), "objects": [("cat", (6, 11, 25, 30), 0)]}})
    write_oriented(root / "JPEGImages" / "a.jpg", shown, 6)
    with pytest.raises(DatasetError, match=r"a\.xml: <size> 80 x 60 is the stored size of .*a\.jpg, which its EXIF "
                                           r"orientation 6 turns to 60 x 80 when shown"):
        load_voc(root, "train", ["cat"])


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "png named .jpg", "16-bit png named .jpg"])
def test_training_images_of_other_modes_load_as_rgb_of_the_annotated_size(tmp_path, kind):
    root = write_voc(tmp_path, {"a": {"size": (40, 30), "objects": [("cat", (2, 2, 20, 20), 0)]}})
    path = root / "JPEGImages" / "a.jpg"
    gray = np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))
    image = {"grayscale": Image.fromarray(gray, "L"), "cmyk": Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK"),
             "png named .jpg": Image.fromarray(np.stack([gray] * 3, -1)),
             "16-bit png named .jpg": Image.fromarray(gray.astype(np.uint16) * 257)}[kind]
    image.save(path, format="PNG" if "png" in kind else "JPEG")
    (record,), _ = load_voc(root, "train", ["cat"])
    pixels = record.load_image()
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert abs(int(pixels[15, 35].mean()) - 210) < 12 and int(pixels[15, 2].mean()) < 20  # the gradient, not noise
