"""`spp-det detect` on folders holding anything: good images processed, bad ones reported."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path, PurePath

import numpy as np
import pytest
from PIL import Image, ImageOps

from spp_det.stages import detect as stage
from spp_det.draw import draw_detections, style_for
from spp_det.detection.postprocess import Detections
from spp_det.stages.detect import safe_output_name
from spp_det.errors import UserError
from spp_det.config import compose_config

CLASSES = ["circle", "square"]
MAX_PIXELS = 5000  # detect.max_pixels in these tests: "big.png" (100x100) is beyond it


class FakeDetector:
    """One detection per proposal, alternating classes, scores 0.9 and 0.4; records the images."""

    classes = CLASSES

    def __init__(self):
        self.images: list[np.ndarray] = []

    def detect(self, image, proposals, score_thresh, nms_iou, max_per_image, bbox_reg=True, timings=None):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.images.append(image.copy())
        n = len(proposals)
        dets = Detections(proposals, np.where(np.arange(n) % 2 == 0, 0.9, 0.4), np.arange(n) % 2 + 1)
        return dets.select(dets.scores > score_thresh)


def fake_proposals(path, image, cfg, prefetch=None):
    h, w = image.shape[:2]
    return np.array([[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]], np.float32)


def write_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """Good images (relative paths) and bad files (relative path -> reason kind)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    (root / "my photos" / "sub").mkdir(parents=True)
    good = {
        "plain.jpg": lambda p: Image.fromarray(rgb).save(p),
        "my photos/holiday snap.JPG": lambda p: Image.fromarray(rgb).save(p, format="JPEG"),
        "my photos/sub/ünïcødé 写真.png": lambda p: Image.fromarray(rgb).save(p),
        "a..b.jpg": lambda p: Image.fromarray(rgb).save(p),
        "..hidden.png": lambda p: Image.fromarray(rgb).save(p),
        "plain.png": lambda p: Image.fromarray(rgb).save(p),  # same stem as plain.jpg: no collision
        "gray.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)])).save(p),
        "sixteen.png": lambda p: Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "one.png": lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
        "rotated.jpg": write_exif_rotated,
    }
    for name, make in good.items():
        make(root / name)
    jpeg = root / "plain.jpg"
    bad = {"empty.jpg": "empty file", "text.jpg": "not an image", "truncated.jpg": "cannot decode",
           "big.png": "too many pixels"}
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture\n")
    noise = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(root / "big.png")
    (root / "notes.txt").write_text("not an image suffix: not listed at all\n")
    assert jpeg.is_file()
    return sorted(good), bad


def write_exif_rotated(path: Path) -> None:
    """Stored 40 wide x 20 high, left half red, right half blue, EXIF orientation 6 (display
    rotated 90 degrees clockwise): displayed 20 wide x 40 high, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake(monkeypatch):
    detector = FakeDetector()
    monkeypatch.setattr(stage, "load_detector", lambda cfg, scorer="svm": detector)
    monkeypatch.setattr(stage, "proposals_for_file", fake_proposals)
    return detector


def config(source, output, *extra):
    return compose_config([f"detect.source={source}", f"detect.output={output}", "detect.checkpoint=unused.pt",
                           "device=cpu", f"detect.max_pixels={MAX_PIXELS}", *extra], stage="detect")


def test_a_folder_of_good_and_bad_files_processes_exactly_the_good_ones(tmp_path, fake, capsys, caplog):
    caplog.set_level(logging.INFO, logger="spp_det.stages.detect")  # the per-step timing line
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    good, bad = write_folder(source)
    before = hashes(source)

    assert stage.run(config(source, output)) == 0

    assert hashes(source) == before  # inputs untouched, nothing written among them
    lines = [json.loads(line) for line in (output / "detections.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {d["file"] for d in lines} == set(good)
    for d in lines:
        assert set(d) == {"file", "class", "score", "box"} and len(d["box"]) == 4
    for name in good:  # both fake detections (scores 0.9, 0.4) pass detect.score_thresh=0
        assert sorted((d["class"], d["score"]) for d in lines if d["file"] == name) == [("circle", 0.9), ("square", 0.4)]
    assert len(fake.images) == len(good)
    assert sorted(image.shape for image in fake.images)[0] == (1, 1, 3)  # the 1x1 image is processed
    # every good file got one annotated copy, its folders mirrored with safe names, all distinct
    names = sorted(p.relative_to(output / "annotated").as_posix() for p in (output / "annotated").rglob("*")
                   if p.is_file())
    assert len(names) == len(good) == len({n.casefold() for n in names})
    for name in names:
        assert re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*/)*[A-Za-z0-9][A-Za-z0-9._-]*\.(jpg|png)", name), name
    assert {n.rpartition("/")[0] for n in names} == {"", "my_photos", "my_photos/sub"}
    assert not list(output.rglob("*.tmp"))
    summary = capsys.readouterr().out
    assert f"{len(good)} images done, {len(bad)} skipped" in summary
    for kind in bad.values():
        assert f"1 {kind}" in summary
    for name in bad:  # each bad file logged with its reason
        assert any(name in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), name
    assert re.search(r"\d+\.\d+ s \(\d+\.\d+ images/s\)", summary)
    steps = [r.getMessage() for r in caplog.records if "seconds per image by step" in r.getMessage()]
    assert len(steps) == 1 and all(f"{step} 0." in steps[0] for step in ("decode", "proposals", "draw")), steps


def test_detections_are_in_displayed_pixels_with_exif_orientation_applied(tmp_path, fake):
    source = tmp_path / "in"
    source.mkdir()
    write_exif_rotated(source / "rotated.jpg")
    assert stage.run(config(source / "rotated.jpg", tmp_path / "out", "detect.score_thresh=-1")) == 0
    image = fake.images[0]
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 60  # top is red
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 60  # bottom is blue
    lines = [json.loads(line) for line in (tmp_path / "out" / "detections.jsonl").read_text().splitlines()]
    assert [d["file"] for d in lines] == ["rotated.jpg", "rotated.jpg"]
    assert [d["class"] for d in lines] == ["circle", "square"]
    assert lines[0]["box"] == [0.0, 0.0, 10.0, 20.0] and lines[1]["box"] == [5.0, 10.0, 20.0, 40.0]
    assert Image.open(tmp_path / "out" / "annotated" / "rotated.jpg").size == (20, 40)


def test_classes_filter_and_unknown_class_names(tmp_path, fake):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (30, 20)).save(source / "x.png")
    assert stage.run(config(source, tmp_path / "out", "detect.score_thresh=-1", "detect.classes=[square]")) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "detections.jsonl").read_text().splitlines()]
    assert [d["class"] for d in lines] == ["square"]
    with pytest.raises(UserError, match="dragon"):
        stage.run(config(source, tmp_path / "out2", "detect.classes=[dragon]"))


def test_exit_code_when_nothing_could_be_processed_or_strict(tmp_path, fake):
    source = tmp_path / "in"
    source.mkdir()
    (source / "empty.jpg").write_bytes(b"")
    assert stage.run(config(source, tmp_path / "out")) == 1
    Image.new("RGB", (30, 20)).save(source / "ok.png")
    assert stage.run(config(source, tmp_path / "out")) == 0
    assert stage.run(config(source, tmp_path / "out", "detect.strict=true")) == 1
    with pytest.raises(UserError, match="no such file or folder"):
        stage.run(config(tmp_path / "missing", tmp_path / "out"))


def test_output_folder_inside_the_source_is_not_read_as_input(tmp_path, fake, capsys):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (30, 20)).save(source / "x.png")
    assert stage.run(config(source, source / "out")) == 0
    assert stage.run(config(source, source / "out")) == 0  # a second run does not detect on its own output
    assert "1 images done, 0 skipped" in capsys.readouterr().out.splitlines()[-1]
    assert [p.name for p in (source / "out" / "annotated").iterdir()] == ["x.png"]


def test_a_failing_detection_is_reported_and_skipped(tmp_path, fake, monkeypatch, capsys):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (30, 20)).save(source / "a.png")
    Image.new("RGB", (31, 20)).save(source / "b.png")

    def proposals(path, image, cfg, prefetch=None):
        if path.name == "a.png":
            raise RuntimeError("boom")
        return fake_proposals(path, image, cfg)

    monkeypatch.setattr(stage, "proposals_for_file", proposals)
    assert stage.run(config(source, tmp_path / "out")) == 0
    assert "1 images done, 1 skipped (1 detection failed)" in capsys.readouterr().out


def test_safe_output_names_mirror_the_input_tree_and_never_collide():
    used: set[str] = set()
    inputs = ["a.jpg", "A.JPG", "../../etc/passwd.png", "x y/z.png", "x_y/z.png", "ünï.png", "..", "-rf.jpg", "a.png",
              "sub/a.jpg", "other/sub/a.jpg", ".hidden/-x.png"]
    names = [safe_output_name(PurePath(p), used) for p in inputs]
    assert len({n.casefold() for n in names}) == len(names)
    assert names[0] == "a.jpg" and names[9] == "sub/a.jpg" and names[10] == "other/sub/a.jpg"  # safe: kept as they are
    for n in names:
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) for part in n.split("/")), n
    assert names[2].startswith("etc/passwd-") and names[3].startswith("x_y/z-") and names[4] == "x_y/z.png"
    assert names[11].startswith("hidden/x-")


def test_drawing_is_readable_on_any_size_and_leaves_the_input_alone():
    assert style_for(1, 1) == (1, 10)
    small_line, small_font = style_for(200, 100)
    big_line, big_font = style_for(4000, 3000)
    assert big_line > small_line and big_font > small_font
    for h, w in ((1, 1), (30, 2000), (600, 800)):
        image = np.full((h, w, 3), 30, np.uint8)
        before = image.copy()
        dets = Detections([[0, 0, w / 2, h / 2]], [0.75], [2])
        out = draw_detections(image, dets, CLASSES)
        assert out.size == (w, h)
        np.testing.assert_array_equal(image, before)
        if h > 20:
            assert (np.asarray(out) != 30).any(axis=2).sum() > 0  # something was drawn


def jsonl_by_file(output: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (output / "detections.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        out.setdefault(d["file"], []).append(d)
    return out


def test_coco_output_loads_in_pycocotools_with_the_jsonl_detections(tmp_path, fake):
    from pycocotools.coco import COCO

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    good, _ = write_folder(source)
    assert stage.run(config(source, output, "detect.format=[jsonl,coco]")) == 0
    assert not (output / "voc").exists()
    expected = jsonl_by_file(output)
    gt = COCO(str(output / "coco_images.json"))
    results = gt.loadRes(str(output / "detections_coco.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == CLASSES
    assert sorted(im["file_name"] for im in gt.imgs.values()) == sorted(good)
    for image_id, image in gt.imgs.items():
        got = sorted((CLASSES[a["category_id"] - 1], a["score"], [a["bbox"][0], a["bbox"][1],
                      a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
                     for a in results.loadAnns(results.getAnnIds(imgIds=[image_id])))
        want = sorted((d["class"], d["score"], d["box"]) for d in expected[image["file_name"]])
        assert [g[:2] for g in got] == [w[:2] for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[2], w[2], atol=0.011)  # both rounded to 0.01 px
        shown = ImageOps.exif_transpose(Image.open(source / image["file_name"]))  # sizes as displayed
        assert (image["width"], image["height"]) == shown.size


def test_voc_xml_output_parses_with_the_projects_voc_loader(tmp_path, fake):
    from spp_det.data.voc import LoadStats, parse_annotation

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    good, _ = write_folder(source)
    assert stage.run(config(source, output, "detect.format=voc")) == 0  # a single name works too
    assert not (output / "detections_coco.json").exists() and (output / "detections.jsonl").is_file()
    expected = jsonl_by_file(output)
    files = sorted((output / "voc").rglob("*.xml"))  # mirroring the input tree
    assert len(files) == len(good)  # plain.jpg and plain.png: two files
    assert (output / "voc" / "plain.xml").is_file()
    class_index = {c: k for k, c in enumerate(CLASSES, start=1)}
    seen = set()
    for xml in files:
        image_path = Path(ET.parse(xml).getroot().findtext("path"))
        relative = image_path.relative_to(source.resolve()).as_posix()
        seen.add(relative)
        record = parse_annotation(xml, image_path, class_index, "error", LoadStats())
        want = sorted((d["class"], d["box"]) for d in expected[relative])
        got = sorted((CLASSES[int(k) - 1], box.tolist()) for k, box in zip(record.labels, record.boxes))
        assert [g[0] for g in got] == [w[0] for w in want]
        for g, w in zip(got, want):  # integer VOC pixels: the box to within half a pixel
            np.testing.assert_allclose(g[1], w[1], atol=0.5 + 0.011)
        assert not record.difficult.any()
    assert seen == set(good)


def test_unknown_output_format_is_refused_before_the_model_loads(tmp_path, fake):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (8, 8)).save(source / "a.png")
    with pytest.raises(UserError, match="detect.format: unknown format.*'pascal'"):
        stage.run(config(source, tmp_path / "out", "detect.format=[jsonl,pascal]"))
    assert not fake.images


def test_labelstudio_tasks_read_back_as_the_jsonl_detections(tmp_path, fake):
    from spp_det.detection.formats import read_labelstudio

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    good, _ = write_folder(source)
    assert stage.run(config(source, output, "detect.format=[labelstudio]")) == 0
    expected = jsonl_by_file(output)
    tasks = json.loads((output / "labelstudio_tasks.json").read_text(encoding="utf-8"))
    assert len(tasks) == len(good)
    for task in tasks:  # Label Studio's import schema: data + predictions of rectanglelabels regions
        assert set(task) == {"data", "predictions"} and task["data"]["image"].startswith("/data/local-files/?d=")
        for region in task["predictions"][0]["result"]:
            assert region["type"] == "rectanglelabels" and (region["from_name"], region["to_name"]) == ("label", "image")
            assert 0 <= region["value"]["x"] <= 100 and 0 <= region["value"]["width"] <= 100
    read = read_labelstudio(output / "labelstudio_tasks.json", CLASSES)
    from urllib.parse import unquote

    urls = {unquote(url.removeprefix("/data/local-files/?d=")): value for url, value in read.items()}
    assert set(urls) == set(good)  # local files relative to detect.source (the default document root)
    for name, ((width, height), dets) in urls.items():
        shown = ImageOps.exif_transpose(Image.open(source / name))
        assert (width, height) == shown.size
        want = sorted((d["class"], d["score"], d["box"]) for d in expected[name])
        got = sorted((CLASSES[int(k) - 1], float(s), b.tolist()) for k, s, b in zip(dets.labels, dets.scores, dets.boxes))
        assert [(g[0], pytest.approx(g[1])) for g in got] == [w[:2] for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[2], w[2], atol=0.011)
    config_xml = ET.parse(output / "labelstudio_config.xml").getroot()
    assert [label.get("value") for label in config_xml.iter("Label")] == CLASSES


def test_labelstudio_image_urls_from_a_prefix_or_a_document_root(tmp_path, fake):
    source = tmp_path / "photos" / "in"
    (source / "sub dir").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(source / "sub dir" / "a b.png")
    out = tmp_path / "out"
    assert stage.run(config(source, out, "detect.format=[labelstudio]",
                            "detect.labelstudio_url=https://example.org/img/")) == 0
    urls = [t["data"]["image"] for t in json.loads((out / "labelstudio_tasks.json").read_text())]
    assert urls == ["https://example.org/img/sub%20dir/a%20b.png"]
    assert stage.run(config(source, out, "detect.format=[labelstudio]", f"detect.labelstudio_root={tmp_path}")) == 0
    urls = [t["data"]["image"] for t in json.loads((out / "labelstudio_tasks.json").read_text())]
    assert urls == ["/data/local-files/?d=photos/in/sub%20dir/a%20b.png"]
    with pytest.raises(UserError, match="labelstudio_root=.*not inside it"):
        stage.run(config(source, out, "detect.format=[labelstudio]", f"detect.labelstudio_root={tmp_path / 'other'}"))
    with pytest.raises(UserError, match="give one of them"):
        stage.run(config(source, out, "detect.labelstudio_url=http://x/", f"detect.labelstudio_root={tmp_path}"))


def test_yolo_labels_mirror_the_input_tree_and_read_back_as_the_detections(tmp_path, fake, caplog):
    from spp_det.detection.formats import read_yolo

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    good, _ = write_folder(source)
    assert stage.run(config(source, output, "detect.format=[jsonl,yolo]")) == 0
    expected = jsonl_by_file(output)
    # plain.jpg takes labels/plain.txt; plain.png (same stem) gets plain.png.txt, with a warning
    assert any("share the label file plain.txt" in r.getMessage() for r in caplog.records)
    label_of = {name: (name + ".txt" if name == "plain.png" else str(PurePath(name).with_suffix(".txt")))
                for name in good}
    sizes = {label_of[n]: ImageOps.exif_transpose(Image.open(source / n)).size for n in good}
    classes, read = read_yolo(output / "yolo", sizes)
    assert classes == CLASSES and set(read) == set(label_of.values())
    assert (output / "yolo" / "labels" / "my photos" / "sub" / "ünïcødé 写真.txt").is_file()  # the image's own name
    for name, label in label_of.items():
        want = sorted((d["class"], d["box"]) for d in expected[name])
        got = sorted((CLASSES[int(k) - 1], b.tolist()) for k, b in zip(read[label].labels, read[label].boxes))
        assert [g[0] for g in got] == [w[0] for w in want]
        for g, w in zip(got, want):  # 6 decimals of the image size
            np.testing.assert_allclose(g[1], w[1], atol=0.011)


def test_two_images_with_one_name_in_two_folders_never_share_an_output(tmp_path, fake):
    source, output = tmp_path / "in", tmp_path / "out"
    for folder in ("a", "b", "a b"):
        (source / folder).mkdir(parents=True)
        Image.new("RGB", (30, 20), (10, 200, 10)).save(source / folder / "img.png")
    Image.new("RGB", (30, 20)).save(source / "a_b.png")
    assert stage.run(config(source, output, "detect.format=[jsonl,voc,yolo,labelstudio]")) == 0
    annotated = sorted(p.relative_to(output / "annotated").as_posix() for p in (output / "annotated").rglob("*.png"))
    assert len(annotated) == 4 and annotated[0] == "a/img.png" and annotated[1] == "a_b.png"
    assert re.fullmatch(r"a_b/img-[0-9a-f]{8}\.png", annotated[2]) and annotated[3] == "b/img.png"  # "a b/": renamed
    assert len(list((output / "voc").rglob("*.xml"))) == 4
    assert sorted(p.relative_to(output / "yolo" / "labels").as_posix()
                  for p in (output / "yolo" / "labels").rglob("*.txt")) == ["a b/img.txt", "a/img.txt", "a_b.txt", "b/img.txt"]
