"""Selective-search proposals: recall on easy images, post-processing, cache, files, the stage."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from unittest import mock
from omegaconf import OmegaConf
from PIL import Image

from spp_det.boxes import box_iou
from spp_det.errors import UserError
from spp_det.proposals import (
    ProposalFileError,
    ProposalImageError,
    cached_proposals,
    compute_proposals,
    load_proposals,
    read_mat,
    read_schema,
    write_schema,
)
from spp_det.proposals import backends as backends_module
from spp_det.proposals.postprocess import interleave, postprocess_boxes
from spp_det.config import compose_config

# the proposals group (every key the backends read) of opencv_fast, at full resolution
OPENCV = {**OmegaConf.to_container(compose_config(["proposals=opencv_fast"]).proposals, resolve=True),
          "backend": "opencv", "mode": "fast", "resize_to": None, "base_k": 150, "inc_k": 150, "sigma": 0.8,
          "seed": 0, "max_boxes": 2000, "min_size": 2}


def shapes_image(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with three solid rectangles and a disc -> (RGB uint8 [H, W, 3], boxes [4, 4])."""
    image = np.full((size, size, 3), 128, np.uint8)
    s = size / 128
    rects = [(10, 12, 50, 40, (230, 30, 30)), (70, 15, 118, 60, (30, 200, 40)), (15, 75, 45, 120, (20, 40, 220))]
    boxes = []
    for x1, y1, x2, y2, colour in rects:
        x1, y1, x2, y2 = (round(v * s) for v in (x1, y1, x2, y2))
        image[y1:y2, x1:x2] = colour  # pixels [x1, x2) x [y1, y2): internal box (x1, y1, x2, y2)
        boxes.append((x1, y1, x2, y2))
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = 90 * s, 95 * s, 20 * s
    disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    image[disc] = (240, 220, 20)
    ys, xs = np.nonzero(disc)
    boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return image, np.array(boxes, np.float32)


def recall(gt: np.ndarray, boxes: np.ndarray, iou: float) -> float:
    return float((box_iou(gt, boxes).max(axis=1) >= iou).mean())


# --- backends on images where the right boxes are obvious -------------------------------------

def test_opencv_fast_finds_every_solid_shape():
    image, gt = shapes_image()
    boxes = compute_proposals(image, OPENCV)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert recall(gt, boxes, 0.7) == 1.0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 128).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 2).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_downscaled_run_scales_boxes_back_to_the_image():
    image, gt = shapes_image(256)
    boxes = compute_proposals(image, {**OPENCV, "resize_to": 128})
    assert recall(gt, boxes, 0.7) == 1.0
    assert boxes[:, 2].max() > 200  # in the 256-pixel image's frame, not the 128-pixel one


def test_two_resolutions_and_custom_strategies_find_every_shape():
    image, gt = shapes_image(160)
    cfg = {**OPENCV, "mode": "custom", "resize_to": [96, None], "color_spaces": ["hsv", "lab"], "k": [100, 300],
           "min_region": 50, "strategies": ["ctsf", "tsf"]}
    boxes = compute_proposals(image, cfg)
    assert recall(gt, boxes, 0.7) == 1.0


def test_passes_merge_every_run_in_turn():
    image, gt = shapes_image(160)
    low = {**OPENCV, "resize_to": 80}
    high = {**OPENCV, "mode": "custom", "color_spaces": ["hsv"], "k": [100], "min_region": 50, "strategies": ["ctsf"]}
    both = compute_proposals(image, {**OPENCV, "passes": [{"resize_to": 80}, {k: high[k] for k in
                                                                              ("mode", "color_spaces", "k", "min_region", "strategies")}],
                                     "max_boxes": 0})
    a, b = compute_proposals(image, {**low, "max_boxes": 0}), compute_proposals(image, {**high, "max_boxes": 0})
    assert recall(gt, both, 0.7) == 1.0
    # every box of either run is kept, once (the order is `interleave`'s, tested above)
    assert {tuple(x) for x in both} == {tuple(x) for x in np.concatenate([a, b])}
    assert len(both) == len({tuple(x) for x in both})


def test_default_multires_setting_finds_every_shape_within_the_box_budget():
    # The paper's default (`~experiment`: configs/proposals/opencv_multires.yaml); its full-resolution
    # pass groups without the colour similarity, so the shapes must still come out as whole regions.
    cfg = compose_config(["~experiment"]).proposals
    assert cfg.passes, "the default proposals setting should be the multi-pass one"
    image, gt = shapes_image(256)
    boxes = compute_proposals(image, cfg)
    assert recall(gt, boxes, 0.7) == 1.0
    assert 0 < len(boxes) <= cfg.max_boxes


EDGEBOXES = OmegaConf.to_container(compose_config(["proposals=edgeboxes"]).proposals, resolve=True)


def test_gradient_edges_are_thin_and_run_along_the_contour():
    """A bright square on grey: edge pixels only on its outline (about one pixel per side, as
    EdgeBoxes' structured edges are), strength in [0, 1], orientation along the side: 0 or pi on
    horizontal sides, pi / 2 on vertical ones."""
    image = np.full((100, 100, 3), 100, np.uint8)
    image[30:70, 20:80] = 220
    edges, orientation = backends_module.gradient_edges(image, sigma=1.0)
    assert edges.shape == orientation.shape == (100, 100) and edges.dtype == np.float32
    assert edges.min() >= 0 and edges.max() <= 1 and edges.max() > 0.5
    strong = edges > 0.3
    ys, xs = np.nonzero(strong)
    near = (np.minimum.reduce([abs(ys - 29.5), abs(ys - 69.5)]) <= 2.5) | (np.minimum.reduce([abs(xs - 19.5), abs(xs - 79.5)]) <= 2.5)
    assert near.all()  # nothing strong away from the outline
    assert strong[50].sum() <= 4 and strong[:, 50].sum() <= 4  # thin: about one pixel per crossing
    left = orientation[40:60, 18:22][strong[40:60, 18:22]]
    top = orientation[28:32, 40:60][strong[28:32, 40:60]]
    assert np.allclose(left, np.pi / 2, atol=0.2)
    assert np.all(np.minimum(top, np.pi - top) < 0.2)


def test_edgeboxes_finds_every_solid_shape_at_full_and_reduced_resolution():
    image, gt = shapes_image(256)
    for resize_to in (None, 128):
        boxes = compute_proposals(image, {**EDGEBOXES, "resize_to": resize_to})
        assert boxes.dtype == np.float32 and 0 < len(boxes) <= EDGEBOXES["max_boxes"]
        assert recall(gt, boxes, 0.7) == 1.0, resize_to
        assert boxes[:, 2].max() > 200  # in the 256-pixel image's frame
    assert (compute_proposals(image, EDGEBOXES) == compute_proposals(image, EDGEBOXES)).all()  # deterministic


def test_fast_setting_interleaves_edgeboxes_with_a_coarse_selective_search():
    """configs/proposals/fast.yaml: passes of two backends; every box of either run is kept once, the
    first two boxes are the two runs' best, and the shapes are found."""
    fast = OmegaConf.to_container(compose_config(["proposals=fast"]).proposals, resolve=True)
    image, gt = shapes_image(256)
    both = compute_proposals(image, {**fast, "max_boxes": 0})
    eb = compute_proposals(image, {**fast, "passes": None, "max_boxes": 0})
    ss = compute_proposals(image, {**fast, "passes": None, **fast["passes"][1], "max_boxes": 0})
    assert len(eb) and len(ss)
    assert {tuple(x) for x in both} == {tuple(x) for x in np.concatenate([eb, ss])}
    assert {tuple(both[0]), tuple(both[1])} == {tuple(eb[0]), tuple(ss[0])}
    assert recall(gt, compute_proposals(image, fast), 0.7) == 1.0


def test_edgeboxes_settings_key_the_cache():
    from spp_det.proposals.cache import settings_dir
    from spp_det.settings import ProposalsSettings

    def folder(settings):
        return settings_dir("c", ProposalsSettings.from_cfg(settings))

    assert folder(EDGEBOXES) != folder({**EDGEBOXES, "alpha": 0.65})
    assert folder(EDGEBOXES) != folder({**EDGEBOXES, "edge_sigma": 1.0})
    assert folder(EDGEBOXES) == folder({**EDGEBOXES, "k": [1, 2]})  # selective search's keys do not
    fast = OmegaConf.to_container(compose_config(["proposals=fast"]).proposals, resolve=True)
    # a pass runs OpenCV's selective search: its settings key the cache too
    assert folder(fast) != folder({**fast, "base_k": 100})


def test_selectivesearch_package_finds_every_solid_shape():
    image, gt = shapes_image(96)
    cfg = {**OPENCV, "backend": "selectivesearch", "resize_to": None, "color_spaces": ["hsv"], "scales": [100],
           "sigma": 0.8, "min_region": 20, "seed": 0, "max_boxes": 2000, "min_size": 2, "passes": None}
    assert recall(gt, compute_proposals(image, cfg), 0.7) == 1.0


def test_same_image_and_settings_give_identical_boxes():
    image, _ = shapes_image()
    first = compute_proposals(image, OPENCV)
    compute_proposals(shapes_image(96)[0], OPENCV)  # advances OpenCV's unseeded rand() in between
    assert np.array_equal(first, compute_proposals(image, OPENCV))


def test_max_boxes_keeps_the_ranked_prefix():
    image, _ = shapes_image()
    every = compute_proposals(image, {**OPENCV, "max_boxes": 0})
    top = compute_proposals(image, {**OPENCV, "max_boxes": 7})
    assert len(every) > 7 and np.array_equal(top, every[:7])


# --- post-processing ---------------------------------------------------------------------------

def test_postprocess_clips_drops_small_and_duplicates_and_keeps_order():
    boxes = np.array([[5, 5, 50, 40],    # kept
                      [-10, 2, 20, 30],  # clipped to x1 = 0
                      [5, 5, 50, 40],    # duplicate of the first
                      [30, 30, 31, 60],  # 1 px wide: under min_size 2
                      [0, 2, 20, 30],    # duplicate of the clipped second box
                      [60, 10, 200, 90]], np.float32)  # clipped to x2 = 100
    out = postprocess_boxes(boxes, width=100, height=80, min_size=2, max_boxes=None)
    np.testing.assert_array_equal(out, [[5, 5, 50, 40], [0, 2, 20, 30], [60, 10, 100, 80]])
    assert len(postprocess_boxes(boxes, 100, 80, 2, max_boxes=2)) == 2


def test_interleave_takes_one_from_each_source_in_turn():
    a = np.array([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]], np.float32)
    b = np.array([[1, 1, 5, 5]], np.float32)
    np.testing.assert_array_equal(interleave([a, b]), [a[0], b[0], a[1], a[2]])


# --- cache -------------------------------------------------------------------------------------

@pytest.fixture
def counting_backend(monkeypatch):
    """Replace the OpenCV backend (one selective-search run) by a fake that counts its calls."""
    calls = []

    def fake(image, cfg):
        calls.append(image.shape)
        h, w = image.shape[:2]
        return np.array([[0, 0, w / 2, h / 2], [1, 1, w, h]], np.float32)

    monkeypatch.setitem(backends_module.BACKENDS, "opencv", fake)
    return calls


def write_voc(root: Path, images: dict[str, np.ndarray | bytes], split: str = "all") -> Path:
    """A VOC-layout folder: one object per image; ``bytes`` values are written as they are (corrupt files)."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, pixels in images.items():
        path = root / "JPEGImages" / f"{image_id}.jpg"
        if isinstance(pixels, bytes):
            path.write_bytes(pixels)
            h, w = 64, 64
        else:
            Image.fromarray(pixels).save(path, quality=95)
            h, w = pixels.shape[:2]
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>13</ymin>"
            "<xmax>50</xmax><ymax>40</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


def records_of(root: Path, split: str = "all"):
    from spp_det.data.voc import load_voc

    return load_voc(root, split, year=None)[0]


def test_cache_hit_miss_and_invalidation(tmp_path, counting_backend):
    rng = np.random.default_rng(0)
    root = write_voc(tmp_path / "voc", {f"im{i}": rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8) for i in range(3)})
    records = records_of(root)
    cache = tmp_path / "cache"

    first = load_proposals(records, OPENCV, cache, workers=1, progress=False)
    assert len(counting_backend) == 3 and set(first) == {"im0", "im1", "im2"}
    again = load_proposals(records, OPENCV, cache, workers=1, progress=False)
    assert len(counting_backend) == 3  # every image a hit
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])

    # A flipped record still gets the unflipped image's (cached) boxes.
    flipped = load_proposals([records[0].flip()], OPENCV, cache, workers=1, progress=False)
    assert len(counting_backend) == 3 and np.array_equal(flipped["im0"], first["im0"])

    # A setting that changes boxes is a miss for every image; `export`/`split` are not.
    load_proposals(records, {**OPENCV, "min_size": 3}, cache, workers=1, progress=False)
    assert len(counting_backend) == 6
    load_proposals(records, {**OPENCV, "export": "x.npz", "split": "test"}, cache, workers=1, progress=False)
    assert len(counting_backend) == 6

    # Changed image content under the same file name: a miss.
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(records[0].path)
    load_proposals(records, OPENCV, cache, workers=1, progress=False)
    assert len(counting_backend) == 7
    entries = sorted(cache.glob("proposals/*/*/*.npy"))
    assert len(entries) == 7 and all(np.load(p, allow_pickle=False).dtype == np.float32 for p in entries)


def test_cached_proposals_are_cached_by_content(tmp_path, counting_backend):
    image, _ = shapes_image(64)
    a, b = tmp_path / "a.png", tmp_path / "copy_of_a.png"
    Image.fromarray(image).save(a)
    b.write_bytes(a.read_bytes())
    first = cached_proposals(a, image, OPENCV, tmp_path / "cache")
    second = cached_proposals(b, image, OPENCV, tmp_path / "cache")  # same bytes, other name: a hit
    assert len(counting_backend) == 1 and np.array_equal(first, second)


def test_worker_processes_fill_the_cache(tmp_path):
    images = {f"im{i}": shapes_image(64)[0][:, ::(i + 1)].copy() for i in range(2)}
    records = records_of(write_voc(tmp_path / "voc", images))
    parallel = load_proposals(records, OPENCV, tmp_path / "cache", workers=2, progress=False)
    for r in records:
        np.testing.assert_array_equal(parallel[r.image_id], compute_proposals(r.load_image(), OPENCV))


def test_prefetcher_searches_ahead_in_workers_and_gives_what_cached_proposals_gives(tmp_path):
    from spp_det.proposals import ProposalPrefetcher

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(shapes_image(64)[0][:, ::(i % 3 + 1)].copy()).save(paths[-1])
    cache = tmp_path / "cache"
    threads = torch.get_num_threads()
    with mock.patch("spp_det.proposals.cache._cores", return_value=3), \
            ProposalPrefetcher(paths, OPENCV, cache, workers=2, lookahead=2) as prefetch:
        assert torch.get_num_threads() == 1  # the network leaves the workers' 2 of 3 cores to them
        first = prefetch.get(paths[0], np.asarray(Image.open(paths[0])))
        assert prefetch.next == 3  # the next two images were handed to the workers before waiting on the first
        got = [first] + [prefetch.get(p, np.asarray(Image.open(p))) for p in paths[1:]]
    for path, boxes in zip(paths, got):
        image = np.asarray(Image.open(path))
        np.testing.assert_array_equal(boxes, compute_proposals(image, OPENCV))
        np.testing.assert_array_equal(boxes, cached_proposals(path, image, OPENCV, cache))  # cached by the workers
    assert len(list(cache.glob("proposals/*/*/*.npy"))) == 3  # 3 distinct images (im3, im4 repeat im0, im1)
    assert torch.get_num_threads() == threads  # given back on close
    with ProposalPrefetcher(paths, OPENCV, cache, workers=2) as prefetch:  # all cached: no processes
        assert prefetch.pool is None and torch.get_num_threads() == threads


def test_prefetcher_falls_back_to_the_caller_when_a_worker_refuses_the_file(tmp_path, caplog):
    from spp_det.proposals import ProposalPrefetcher

    path = tmp_path / "big.png"
    image = shapes_image(64)[0]
    Image.fromarray(image).save(path)
    with ProposalPrefetcher([path], OPENCV, tmp_path / "cache", workers=1, max_pixels=100) as prefetch:
        boxes = prefetch.get(path, image)  # the worker refuses 64 x 64 > 100 pixels; the caller's pixels are used
    np.testing.assert_array_equal(boxes, compute_proposals(image, OPENCV))


# --- precomputed files -------------------------------------------------------------------------

def test_rcnn_mat_import_converts_coordinates(tmp_path):
    import scipy.io

    boxes = np.empty((2,), dtype=object)
    boxes[0] = np.array([[10, 20, 50, 80], [1, 1, 375, 500]], dtype=np.float64)  # y1 x1 y2 x2, 1-based
    boxes[1] = np.array([[5, 6, 7, 8]], dtype=np.float64)
    images = np.empty((2,), dtype=object)
    images[:] = ["000005", "000007"]
    path = tmp_path / "voc_2007_test.mat"
    scipy.io.savemat(path, {"boxes": boxes, "images": images})

    table = read_mat(path)
    # x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax (as VOC boxes)
    np.testing.assert_array_equal(table["000005"], [[19, 9, 80, 50], [0, 0, 500, 375]])
    np.testing.assert_array_equal(table["000007"], [[5, 4, 8, 7]])

    cfg = {**OPENCV, "backend": "precomputed", "file": str(path), "max_boxes": 2000, "min_size": 2}
    records = [type("R", (), {"image_id": "000005", "width": 500, "height": 375, "path": "x"})()]
    assert np.array_equal(load_proposals(records, cfg, tmp_path / "cache")["000005"], table["000005"])
    with pytest.raises(UserError, match="000009"):
        cached_proposals(tmp_path / "000009.jpg", np.zeros((10, 10, 3), np.uint8), cfg, tmp_path / "cache")


def test_mat_with_wrong_order_or_shape_says_what_was_expected(tmp_path):
    import scipy.io

    for name, cell in (("swapped", np.array([[10, 50, 40, 20]], float)),  # x2 < x1
                       ("three_columns", np.array([[1, 2, 3]], float))):
        boxes = np.empty((1,), dtype=object)
        boxes[0] = cell
        images = np.empty((1,), dtype=object)
        images[:] = ["a"]
        path = tmp_path / f"{name}.mat"
        scipy.io.savemat(path, {"boxes": boxes, "images": images})
        with pytest.raises(ProposalFileError, match=r"expected.*y1 x1 y2 x2"):
            read_mat(path)


def test_schema_round_trip_and_bad_schema(tmp_path):
    boxes = {"a": np.array([[0.5, 1.25, 10, 20.75], [3, 4, 5, 6]], np.float32), "b": np.zeros((0, 4), np.float32),
             "c": np.array([[7, 8, 9, 10]], np.float32)}
    path = write_schema(tmp_path / "boxes.npz", boxes)
    back = read_schema(path)
    assert list(back) == ["a", "b", "c"]
    for key in boxes:
        np.testing.assert_array_equal(back[key], boxes[key])

    np.savez(tmp_path / "swapped.npz", ids=np.array(["a"]), counts=np.array([1]), boxes=np.array([[10, 0, 5, 5]], np.float32))
    with pytest.raises(ProposalFileError, match="expected internal order x1 y1 x2 y2"):
        read_schema(tmp_path / "swapped.npz")
    np.savez(tmp_path / "shape.npz", ids=np.array(["a"]), counts=np.array([1]), boxes=np.zeros((1, 5), np.float32))
    with pytest.raises(ProposalFileError, match=r"expected 'ids'"):
        read_schema(tmp_path / "shape.npz")


# --- the stage ---------------------------------------------------------------------------------

def stage_config(tmp_path, root, *extra):
    return compose_config([f"data.root={root}", "data.year=null", "data.train_split=all", "data.test_split=all",
                           "data.classes=[cat]", f"cache_dir={tmp_path / 'cache'}", "num_workers=1", *extra],
                          stage="proposals")


def test_stage_exports_a_split_and_the_export_reads_back_unchanged(tmp_path):
    from spp_det.stages.proposals import run

    images = {f"im{i}": shapes_image(64 + 16 * i)[0] for i in range(2)}
    root = write_voc(tmp_path / "voc", images)
    export = tmp_path / "out" / "all.npz"
    cfg = stage_config(tmp_path, root, "proposals.resize_to=48", f"proposals.export={export}")
    assert run(cfg) == 0
    computed = load_proposals(records_of(root), cfg.proposals, cfg.cache_dir, workers=1, progress=False)
    exported = read_schema(export)
    assert set(exported) == set(images)
    for key in images:
        np.testing.assert_array_equal(exported[key], computed[key])
    # ...and as the precomputed backend
    pre = stage_config(tmp_path, root, "proposals=precomputed", f"proposals.file={export}")
    again = load_proposals(records_of(root), pre.proposals, pre.cache_dir, progress=False)
    for key in images:
        np.testing.assert_array_equal(again[key], computed[key])


def test_stage_lists_every_corrupt_image_fails_and_keeps_good_entries(tmp_path, caplog, counting_backend):
    from spp_det.stages.proposals import run

    good = shapes_image(64)[0]
    root = write_voc(tmp_path / "voc", {"good1": good, "bad1": b"not a jpeg at all",
                                        "good2": good[:, ::-1].copy(), "bad2": b"\xff\xd8\xff\xe0 truncated"})
    cfg = stage_config(tmp_path, root)
    with caplog.at_level(logging.ERROR):
        assert run(cfg) == 1
    message = caplog.text
    assert "bad1.jpg" in message and "bad2.jpg" in message and "good1" not in message
    assert len(list((tmp_path / "cache").glob("proposals/*/*/*.npy"))) == 2
    with pytest.raises(ProposalImageError) as info:
        load_proposals(records_of(root), cfg.proposals, cfg.cache_dir, workers=1, progress=False)
    assert sorted(Path(p).name for p in info.value.bad) == ["bad1.jpg", "bad2.jpg"]
    runs = len(cfg.proposals.passes or [None])  # the fake is one run: once per pass and image
    assert len(counting_backend) == 2 * runs  # the good images were hits the second time
