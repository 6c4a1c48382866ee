"""The synthetic VOC-layout dataset (spp_det/data/synth.py): layout, ground truth, determinism."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from spp_det.data import synth
from spp_det.data.voc import load_voc
from spp_det.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SYNTH_CFG = OmegaConf.load(REPO / "configs" / "synth" / "default.yaml")
CLASSES = list(SYNTH_CFG.classes)
N_IMAGES = 20


def settings(**changes):
    cfg = OmegaConf.to_container(SYNTH_CFG)
    cfg.update({"pretrain_images": 0, **changes})  # the default's 1,000 pretraining images: only where a test asks
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "shapes"
    summary = synth.write_synthetic(root, settings(num_images=N_IMAGES), CLASSES, progress=False)
    return root, summary


def xml_objects(path: Path):
    tree = ET.parse(path).getroot()
    size = tree.find("size")
    w, h = int(size.findtext("width")), int(size.findtext("height"))
    objs = []
    for obj in tree.findall("object"):
        bb = obj.find("bndbox")
        objs.append({
            "name": obj.findtext("name"),
            "pose": obj.findtext("pose"),
            "difficult": obj.findtext("difficult"),
            "truncated": obj.findtext("truncated"),
            "box": [bb.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")],
        })
    return w, h, objs


def test_config_has_at_least_five_shape_classes_and_data_synth_uses_them():
    from spp_det.config import compose_config

    cfg = compose_config(["data=synth"], stage="synth")
    assert list(cfg.data.classes) == list(cfg.synth.classes) == CLASSES
    assert len(CLASSES) >= 5 and set(CLASSES) <= set(synth.SHAPES)


def test_loader_reads_every_split_and_counts_match_the_summary(dataset):
    root, summary = dataset
    all_ids = set()
    for split in ("train", "val", "test", "trainval"):
        records, stats = load_voc(root, split, CLASSES)
        assert stats.clipped_boxes == 0 and stats.empty_boxes == 0  # boxes are written inside the image
        assert len(records) == summary["images"][split] > 0
        assert sum(len(r.boxes) for r in records) == summary["objects"][split]
        assert sum(int(r.difficult.sum()) for r in records) == summary["difficult"][split]
        assert sum(int(r.truncated.sum()) for r in records) == summary["truncated"][split]
        if split != "trainval":
            ids = {r.image_id for r in records}
            assert not ids & all_ids  # train, val and test are disjoint
            all_ids |= ids
    assert len(all_ids) == summary["images"]["total"] == N_IMAGES
    # default fractions 0.5 / 0.1 / 0.4
    assert [summary["images"][s] for s in ("train", "val", "test")] == [10, 2, 8]
    assert synth.split_counts(300, (("train", 0.5), ("val", 0.1), ("test", 0.4))) == {"train": 150, "val": 30, "test": 120}


def test_every_class_appears_and_the_hard_cases_are_present_but_do_not_dominate(dataset):
    _, summary = dataset
    per_class = summary["per_class"]
    assert set(per_class) == set(CLASSES)
    assert all(per_class[c]["objects"] > 0 for c in CLASSES)
    assert sum(pc["objects"] for pc in per_class.values()) == summary["objects"]["total"]
    total = summary["objects"]["total"]
    for key in ("difficult", "truncated"):
        assert 0 < summary[key]["total"] < 0.35 * total, key
    assert 0 < summary["occluded"] < 0.5 * total


def test_image_sizes_aspects_and_boxes_are_in_range(dataset):
    root, _ = dataset
    s = synth.SynthSettings.from_cfg(settings())
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        w, h, objs = xml_objects(xml_path)
        assert Image.open(root / "JPEGImages" / f"{xml_path.stem}.jpg").size == (w, h)
        assert s.min_side <= min(w, h) and max(w, h) <= s.max_side
        assert max(w, h) / min(w, h) <= s.max_aspect + 0.01
        assert objs, f"{xml_path} has no objects"
        for o in objs:
            assert o["pose"] == "Unspecified"
            xmin, ymin, xmax, ymax = (int(v) for v in o["box"])  # VOC: integers, 1-based inclusive
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
            side = max(xmax - xmin + 1, ymax - ymin + 1)
            if o["truncated"] == "0":  # the full extent is inside: its size is the drawn size
                assert s.min_object - 2 <= side <= s.max_object_frac * min(w, h) + 2
            else:  # a truncated box reaches a border
                assert xmin == 1 or ymin == 1 or xmax == w or ymax == h


def test_difficult_marks_exactly_the_small_objects(dataset):
    root, _ = dataset
    below = SYNTH_CFG.difficult_below
    n_difficult = 0
    for split in ("trainval", "test"):
        for r in load_voc(root, split, CLASSES)[0]:
            longer = np.maximum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1])
            np.testing.assert_array_equal(r.difficult, longer < below)
            n_difficult += int(r.difficult.sum())
    assert n_difficult > 0


def test_per_class_split_files_follow_the_devkit(dataset):
    root, _ = dataset
    main = root / "ImageSets" / "Main"
    for split in ("train", "val", "test", "trainval"):
        ids = main.joinpath(f"{split}.txt").read_text().split()
        records = {r.image_id: r for r in load_voc(root, split, CLASSES)[0]}
        for k, name in enumerate(CLASSES, start=1):
            lines = main.joinpath(f"{name}_{split}.txt").read_text().splitlines()
            assert [ln.split()[0] for ln in lines] == ids
            for ln in lines:
                image_id, label = ln[:6], ln[6:]
                r = records[image_id]
                mine = r.labels == k
                expected = " 1" if (mine & ~r.difficult).any() else (" 0" if mine.any() else "-1")
                assert label == " " + expected, (split, name, ln)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    small = dict(num_images=3, max_side=320)
    synth.write_synthetic(tmp_path / "a", settings(**small), CLASSES, progress=False)
    synth.write_synthetic(tmp_path / "b", settings(**small), CLASSES, progress=False)
    synth.write_synthetic(tmp_path / "c", settings(**small, seed=1), CLASSES, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file() and p.name != "synth_summary.json")  # the summary holds a timing
    assert any(f.suffix == ".jpg" for f in files) and any(f.suffix == ".xml" for f in files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in ("JPEGImages/000001.jpg", "Annotations/000001.xml"):
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f


def test_pretrain_images_are_an_extra_split_that_leaves_the_others_unchanged(tmp_path):
    small = dict(num_images=4, max_side=240)
    synth.write_synthetic(tmp_path / "a", settings(**small), CLASSES, progress=False)
    summary = synth.write_synthetic(tmp_path / "b", settings(**small, pretrain_images=3), CLASSES, progress=False)
    main_a, main_b = tmp_path / "a" / "ImageSets" / "Main", tmp_path / "b" / "ImageSets" / "Main"
    assert not (main_a / "pretrain.txt").exists()
    assert (main_b / "pretrain.txt").read_text().split() == ["000005", "000006", "000007"]
    for split in ("train", "val", "test", "trainval"):
        assert (main_a / f"{split}.txt").read_text() == (main_b / f"{split}.txt").read_text()
    for image_id in (main_a / "trainval.txt").read_text().split() + (main_a / "test.txt").read_text().split():
        assert (tmp_path / "a" / "JPEGImages" / f"{image_id}.jpg").read_bytes() == \
            (tmp_path / "b" / "JPEGImages" / f"{image_id}.jpg").read_bytes()
    records, _ = load_voc(tmp_path / "b", "pretrain", CLASSES)
    assert len(records) == 3 and summary["images"]["pretrain"] == 3 and summary["images"]["total"] == 7
    assert summary["objects"]["pretrain"] == sum(len(r.boxes) for r in records)
    assert "pretrain" in synth.format_summary(summary)


def test_refuses_a_non_empty_root_and_overwrite_keeps_other_files(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=re.escape(str(root))):
        synth.write_synthetic(root, settings(num_images=2, max_side=240), CLASSES, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]

    synth.write_synthetic(root, settings(num_images=2, max_side=240, overwrite=True), CLASSES, progress=False)
    assert (root / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not empty"):  # its own earlier output is not replaced silently either
        synth.write_synthetic(root, settings(num_images=2, max_side=240), CLASSES, progress=False)
    summary = synth.write_synthetic(root, settings(num_images=3, max_side=240, overwrite=True), CLASSES, progress=False)
    assert len(list((root / "JPEGImages").iterdir())) == summary["images"]["total"] == 3
    assert not [p for p in root.iterdir() if p.name.startswith(synth.PARTIAL_PREFIX)]


def test_an_interrupted_run_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    real = synth.draw_image

    def crash_on_third(seed, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return real(seed, index, *args)

    monkeypatch.setattr(synth, "draw_image", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic(tmp_path / "d", settings(num_images=4, max_side=240), CLASSES, progress=False)
    assert list((tmp_path / "d").iterdir()) == []  # no ImageSets, no half-filled folders, no partial dir


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hexagon"):
        synth.write_synthetic(tmp_path / "e", settings(num_images=2), ["circle", "hexagon"], progress=False)
    with pytest.raises(UserError, match="synth.min_side"):
        synth.write_synthetic(tmp_path / "e", settings(min_side=700), CLASSES, progress=False)
    with pytest.raises(UserError, match="unknown setting"):
        synth.write_synthetic(tmp_path / "e", settings(colour="red"), CLASSES, progress=False)


def test_objects_stand_out_from_what_lies_beneath_them():
    """Selective search needs contrast: the pixels of each visible, non-tiny object are closer to
    its own mean colour than to the mean of a ring of pixels just outside its box."""
    s = synth.SynthSettings.from_cfg(settings())
    checked = 0
    for i in range(4):
        image, objects, _ = synth.draw_image(0, i, s, CLASSES)
        image = image.astype(np.float32)
        for o in objects:
            if o.difficult or o.occluded or o.truncated:
                continue
            x1, y1, x2, y2 = (int(v) for v in o.box)
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            if o.name == "ring":  # the centre of a ring is a hole: sample its band instead
                cx = x1 + max(1, int(0.1 * (x2 - x1)))
            inside = image[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3).mean(0)
            outside = np.concatenate([image[max(y1 - 4, 0): y1, x1:x2].reshape(-1, 3),
                                      image[y2: y2 + 4, x1:x2].reshape(-1, 3)])
            if len(outside) == 0:
                continue
            assert np.linalg.norm(inside - outside.mean(0)) > 30, (i, o)
            checked += 1
    assert checked >= 4


def test_cli_writes_the_dataset_and_refuses_to_write_it_twice(tmp_path):
    from conftest import spp_det_cli

    root = tmp_path / "cli_synth"
    args = ["synth", f"data.root={root}", "synth.num_images=12", "synth.pretrain_images=3", f"hydra.run.dir={tmp_path / 'run'}"]
    done = spp_det_cli(*args, cwd=tmp_path)  # through the CLI's main(argv), in this process
    assert done.returncode == 0, done.stderr
    assert "images" in done.stdout and "difficult" in done.stdout
    for name in CLASSES:
        assert name in done.stdout  # the per-class table
    records, _ = load_voc(root, "test", CLASSES)
    assert len(records) == 5  # 12 images at 0.5 / 0.1 / 0.4 -> 6 / 1 / 5
    assert len(load_voc(root, "pretrain", CLASSES)[0]) == 3
    again = spp_det_cli(*args, cwd=tmp_path)
    assert again.returncode == 1
    assert "not empty" in again.stderr + again.stdout and str(root) in again.stderr + again.stdout
