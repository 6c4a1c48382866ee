"""VOC AP as the devkit computes it, COCO numbers, result files, the eval stage."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spp_det.data.voc import ImageRecord, load_voc
from spp_det.detection.postprocess import Detections, postprocess
from spp_det.errors import UserError
from spp_det.evaluation.coco import coco_metrics
from spp_det.evaluation.results import read_results, write_results
from spp_det.stages.evaluate import format_table, score_detections
from spp_det.evaluation.voc_ap import VOC07_THRESHOLDS, VOCEvaluator, evaluate_class, voc07_ap, voc10_ap

from conftest import VOC_SAMPLE  # one place (SPP_DET_VOC_SAMPLE overrides it)


def record(image_id, boxes, labels, difficult=None, width=100, height=100) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), width, height, boxes, np.asarray(labels, np.int64),
                       np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool), np.zeros(n, bool))


def dets(boxes, scores, labels) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), scores, labels)


A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]


# ---------------------------------------------------------------------------------- VOC AP


def test_a_difficult_box_is_neither_a_hit_nor_a_miss():
    ev = VOCEvaluator([record("img", [A, B], [1, 1], difficult=[False, True])], ["thing"])
    ev.process("img", dets([B, A], [0.9, 0.8], [1, 1]))  # the best-scored one hits the difficult box
    res = ev.class_results()["thing"]
    assert res.npos == 1 and res.num_difficult == 1
    assert res.tp.tolist() == [False, True] and res.fp.tolist() == [False, False]
    out = ev.evaluate()
    assert out["ap_voc07"]["thing"] == pytest.approx(1.0) and out["ap_voc10"]["thing"] == pytest.approx(1.0)


def test_a_duplicate_is_a_false_positive_and_07_differs_from_10_on_the_same_curve():
    ev = VOCEvaluator([record("img", [A, C], [1, 1])], ["thing"])
    ev.process("img", dets([A, A, C], [0.9, 0.8, 0.7], [1, 1, 1]))
    res = ev.class_results()["thing"]
    assert res.tp.tolist() == [True, False, True] and res.fp.tolist() == [False, True, False]
    np.testing.assert_allclose(res.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(res.precision, [1.0, 0.5, 2 / 3])
    # VOC10: envelope [1, 2/3, 2/3]; area 0.5 * 1 + 0.5 * 2/3
    assert res.ap10 == pytest.approx(0.5 + 0.5 * 2 / 3)
    # VOC07: t = 0 .. 0.5 see precision 1 (6 points), t = 0.6 .. 1 see 2/3 (5 points)
    assert res.ap07 == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert res.ap07 != pytest.approx(res.ap10)


def test_iou_exactly_half_is_a_hit_as_in_the_matlab_devkit():
    gt = [record("img", [A], [1])]
    at_half = VOCEvaluator(gt, ["thing"])
    at_half.process("img", dets([[0, 0, 10, 5]], [1.0], [1]))  # IoU = 50 / 100 = 0.5 exactly
    assert at_half.evaluate()["ap_voc10"]["thing"] == 1.0
    below = VOCEvaluator(gt, ["thing"])
    below.process("img", dets([[0, 0, 10, 4.9]], [1.0], [1]))
    assert below.evaluate()["ap_voc10"]["thing"] == 0.0


def test_detection_takes_the_box_with_highest_iou_even_when_it_is_already_matched():
    # det 2 overlaps the matched box A most (IoU 0.8) and the free box A' less (IoU >= 0.5):
    # the devkit still assigns it to A, so it is a duplicate, not a hit on A'.
    a2 = [2, 0, 12, 10]
    ev = VOCEvaluator([record("img", [A, a2], [1, 1])], ["thing"])
    ev.process("img", dets([A, [0.5, 0, 10.5, 10]], [0.9, 0.8], [1, 1]))
    assert ev.class_results()["thing"].tp.tolist() == [True, False]


def test_class_without_detections_is_zero_and_class_without_ground_truth_is_absent():
    records = [record("a", [A, B], [1, 2]), record("b", [C, A], [1, 3], difficult=[False, True])]
    ev = VOCEvaluator(records, ["one", "two", "three", "four"])
    ev.process("a", dets([A], [1.0], [1]))
    ev.process("b", dets([C, B, A], [1.0, 0.5, 0.5], [1, 3, 4]))  # class 3 only difficult, class 4 no GT
    out = ev.evaluate()
    # (the 11-point sum of eleven 1/11 is 1 + 2e-16, as in the devkit)
    assert out["ap_voc07"] == {"one": pytest.approx(1.0), "two": 0.0, "three": None, "four": None}
    assert out["ap_voc10"] == {"one": 1.0, "two": 0.0, "three": None, "four": None}
    assert out["map_voc07"] == pytest.approx(0.5) and out["map_voc10"] == pytest.approx(0.5)
    assert out["num_gt"] == {"one": 2, "two": 1, "three": 0, "four": 0}
    assert out["num_det"] == {"one": 2, "two": 0, "three": 1, "four": 1}
    table = format_table({**out, "coco": None})
    assert "three" in table and "     -" in table and "mean" in table


def test_11_point_thresholds_are_matlabs_0_to_1_by_0_1():
    # MATLAB's colon gives 0.30000000000000004 (first half, a + 3*d) but 0.7 as 1 - 3*d:
    # recall 7/10 reaches t = 0.7, recall 3/10 does not reach t = 0.3 (numpy's arange: neither).
    assert VOC07_THRESHOLDS[3] > 0.3 and VOC07_THRESHOLDS[7] <= 7 / 10 and VOC07_THRESHOLDS[6] <= 6 / 10
    for hits, points in ((7, 8), (3, 3), (5, 6)):
        recall = np.arange(1, hits + 1) / 10
        assert voc07_ap(recall, np.ones(hits)) == pytest.approx(points / 11)
        assert voc10_ap(recall, np.ones(hits)) == pytest.approx(hits / 10)


def test_no_detections_at_all_gives_zero_and_empty_curve():
    res = evaluate_class(np.zeros(0), np.zeros(0), np.zeros((0, 4)), [np.array([A], np.float32)], [np.zeros(1, bool)])
    assert res.ap07 == 0.0 and res.ap10 == 0.0 and res.num_det == 0


def test_unknown_image_id_is_refused():
    ev = VOCEvaluator([record("a", [A], [1])], ["one"])
    with pytest.raises(KeyError, match="zzz"):
        ev.process("zzz", Detections.empty())


# --------------------------------------------------------------------- perfect detections


def perfect(records) -> dict[str, Detections]:
    return {r.image_id: Detections(r.boxes, np.ones(len(r.boxes)), r.labels) for r in records}


def check_perfect(records, classes):
    metrics = score_detections(records, classes, perfect(records), "test")
    present = {c for c in classes if metrics["num_gt"][c] > 0}
    assert present, "no ground truth at all"
    for c in classes:
        if c in present:
            assert metrics["ap_voc07"][c] == pytest.approx(1.0), c
            assert metrics["ap_voc10"][c] == pytest.approx(1.0), c
        else:
            assert metrics["ap_voc07"][c] is None
    assert metrics["map_voc07"] == pytest.approx(1.0) and metrics["map_voc10"] == pytest.approx(1.0)
    assert metrics["coco"]["AP"] == pytest.approx(1.0) and metrics["coco"]["AP50"] == pytest.approx(1.0)
    assert metrics["coco"]["AP75"] == pytest.approx(1.0)
    return metrics


@pytest.fixture(scope="module")
def voc_sample():
    if not (VOC_SAMPLE / "VOC2012").is_dir():
        pytest.skip(f"VOC sample not found at {VOC_SAMPLE}")
    records, _ = load_voc(VOC_SAMPLE, "all", year=2012)
    return records


def test_perfect_detections_score_one_on_the_voc_sample(voc_sample):
    from spp_det.data.voc import VOC_CLASSES

    metrics = check_perfect(voc_sample, list(VOC_CLASSES))
    assert sum(metrics["num_gt"].values()) > 100


def write_tiny_voc(root: Path, classes) -> None:
    """A minimal VOC-layout set (used when the synthetic generator is not available)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(6):
        image_id = f"{i:06d}"
        ids.append(image_id)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        objects = ""
        for j in range(1 + i % 3):
            x1, y1 = int(rng.integers(1, 40)), int(rng.integers(1, 30))
            x2, y2 = x1 + int(rng.integers(5, 38)), y1 + int(rng.integers(5, 28))
            objects += (f"<object><name>{classes[(i + j) % len(classes)]}</name><difficult>{int(j == 2)}</difficult>"
                        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>80</width><height>60</height><depth>3</depth></size>{objects}</annotation>")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    """(root, records, classes) of a small synthetic VOC-layout set."""
    root = tmp_path_factory.mktemp("synth")
    classes = ["circle", "triangle", "square", "star", "cross", "ring"]
    try:
        from spp_det.data.synth import write_synthetic
    except ImportError:
        write_tiny_voc(root, classes)
    else:
        write_synthetic(root, {"num_images": 10, "pretrain_images": 0, "min_side": 64, "max_side": 96, "fractions": {"test": 1.0},
                               "objects_per_image": [2, 4], "seed": 3}, classes, progress=False)
    records, _ = load_voc(root, "test", classes, year=None)
    return root, records, classes


def test_perfect_detections_score_one_on_the_synthetic_set(synth_set):
    _, records, classes = synth_set
    check_perfect(records, classes)


def noisy_detections(records, num_classes, seed=0) -> dict[str, Detections]:
    """Ground truth jittered, duplicated, mislabelled and mixed with random boxes; tied scores too."""
    rng = np.random.default_rng(seed)
    out = {}
    for r in records:
        boxes = [r.boxes + rng.normal(0, 3, r.boxes.shape), r.boxes[: 1],
                 rng.uniform(0, 50, (3, 2)).repeat(2, axis=1) + [0, 0, 20, 20]]
        boxes = np.concatenate(boxes).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = np.concatenate([r.labels, r.labels[:1], rng.integers(1, num_classes + 1, 3)])
        scores = np.round(rng.normal(0, 1, len(boxes)), 1).astype(np.float32)  # rounding makes ties
        out[r.image_id] = Detections(boxes, scores, labels)
    return out


def test_result_files_written_then_scored_give_the_numbers_of_scoring_in_memory(synth_set, tmp_path):
    _, records, classes = synth_set
    detections = noisy_detections(records, len(classes))
    in_memory = score_detections(records, classes, detections, "test", out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("comp4_det_test_*.txt")) == sorted(
        f"comp4_det_test_{c}.txt" for c in classes)
    assert 0 < in_memory["map_voc07"] < 1
    read_back = read_results(tmp_path, "test", classes, [r.image_id for r in records])
    from_files = score_detections(records, classes, read_back, "test")
    for key in ("map_voc07", "map_voc10", "ap_voc07", "ap_voc10", "num_det", "pr_curves", "coco"):
        assert from_files[key] == in_memory[key], key
    for r in records:  # boxes and scores survive the 1-based text format exactly
        np.testing.assert_array_equal(np.sort(read_back[r.image_id].scores), np.sort(detections[r.image_id].scores))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["map_voc07"] == in_memory["map_voc07"] and "pr_curves" not in saved
    assert set(saved["coco"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_file_lines_are_one_based_voc_pixels(tmp_path):
    write_results(tmp_path, "test", ["one"], {"img": dets([[0, 1, 10, 11]], [0.5], [1])})
    assert (tmp_path / "comp4_det_test_one.txt").read_text() == "img 0.5 1.0 2.0 10.0 11.0\n"


@pytest.mark.parametrize("line, message", [
    ("img 0.5 1 2 10", "6 fields"),
    ("img high 1 2 10 11", "must be numbers"),
    ("img nan 1 2 10 11", "finite"),
    ("other 0.5 1 2 10 11", "'other' is not in split"),
])
def test_malformed_result_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "comp4_det_test_one.txt").write_text(f"img 0.9 1 1 5 5\n\n{line}\n")
    with pytest.raises(UserError, match=rf"comp4_det_test_one.txt:3: .*{message}"):
        read_results(tmp_path, "test", ["one"], ["img"])


def test_result_file_of_unknown_class_or_no_files_is_an_error(tmp_path):
    (tmp_path / "comp4_det_test_dragon.txt").write_text("img 0.9 1 1 5 5\n")
    with pytest.raises(UserError, match="dragon.*not in data.classes"):
        read_results(tmp_path, "test", ["one"], ["img"])
    with pytest.raises(UserError, match="no result files"):
        read_results(tmp_path, "val", ["one"], ["img"])


def test_coco_metrics_without_detections_are_zero():
    records = [record("a", [A], [1])]
    assert coco_metrics(records, ["one"], {"a": Detections.empty()})["AP"] == 0.0


# ------------------------------------------------------------------------ post-processing


def test_postprocess_thresholds_suppresses_per_class_and_keeps_top_k():
    import torch

    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [5, 5, 5, 9]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.85], [0.1, -2.0], [3.0, 3.0]])  # column k is class k + 1
    out = postprocess(boxes, scores, score_thresh=0.0, nms_iou=0.3, max_per_image=100)
    # boxes 0 and 1 overlap (IoU 0.82): box 1 is suppressed in class 1, box 0 in class 2;
    # the empty box 3 is dropped whatever its score; -2.0 is below the threshold
    got = sorted(zip(out.labels.tolist(), out.scores.tolist()))
    assert [g[0] for g in got] == [1, 1, 2] and [g[1] for g in got] == pytest.approx([0.1, 0.9, 0.85])
    assert np.all(np.diff(out.scores) <= 0)  # sorted by score
    top2 = postprocess(boxes, scores, 0.0, 0.3, max_per_image=2)
    np.testing.assert_allclose(top2.scores, [0.9, 0.85])
    assert top2.labels.tolist() == [1, 2]
    per_class = postprocess(boxes[:, None, :].expand(4, 2, 4), scores, 0.0, 0.3, 100)
    np.testing.assert_array_equal(per_class.scores, out.scores)
    assert out.boxes.dtype == np.float32 and out.labels.dtype == np.int64


def test_postprocess_of_nothing_is_empty():
    out = postprocess(np.zeros((0, 4)), np.zeros((0, 3)), -1.5, 0.3, 100)
    assert len(out) == 0 and out.boxes.shape == (0, 4)


# ------------------------------------------------------------------------------- the stage


def test_eval_stage_scores_a_results_folder_without_a_model(synth_set, tmp_path, monkeypatch, capsys):
    from spp_det.stages import evaluate as stage
    from spp_det.config import compose_config
    from spp_det.settings import RunSettings

    root, records, classes = synth_set
    results = tmp_path / "results"
    write_results(results, "test", classes, perfect(records))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    cfg = compose_config(["data=synth", f"data.root={root}", "data.year=null", "data.test_split=test",
                          f"eval.results_dir={results}"], stage="eval")
    assert stage.run(cfg) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["map_voc07"] == pytest.approx(1.0) and metrics["num_images"] == len(records)
    assert "mean" in capsys.readouterr().out
    assert not list(run_dir.glob("comp4_*"))  # the input files are not rewritten elsewhere


class FakeDetector:
    """Returns the ground truth of the records, in the order it is called."""

    def __init__(self, records, classes):
        self.classes = classes
        self.records = records
        self.calls = 0
        self.geometry = SimpleNamespace(scales=(160, 320), max_size=640)

    def detect(self, image, proposals, score_thresh, nms_iou, max_per_image, bbox_reg=True, timings=None):
        r = self.records[self.calls]
        self.calls += 1
        assert image.shape == (r.height, r.width, 3)
        timings["svm"] = timings.get("svm", 0.0) + 0.001
        return Detections(r.boxes, np.ones(len(r.boxes)), r.labels)


def test_evaluate_detector_runs_over_the_split_and_reports_times(synth_set, tmp_path):
    from spp_det.stages.evaluate import check_classes, evaluate_detector
    from spp_det.config import compose_config
    from spp_det.settings import RunSettings

    root, records, classes = synth_set
    cfg = compose_config(["data=synth", f"data.root={root}", "data.year=null", "device=cpu"], stage="eval")
    detector = FakeDetector(records, classes)
    proposals = {r.image_id: np.zeros((0, 4), np.float32) for r in records}
    metrics = evaluate_detector(detector, records, RunSettings.of(cfg), out_dir=tmp_path, proposals=proposals)
    assert detector.calls == len(records)
    assert metrics["map_voc10"] == pytest.approx(1.0)
    assert metrics["seconds_per_image"]["svm"] == pytest.approx(0.001)
    assert metrics["scales"] == [160, 320] and metrics["max_size"] == 640  # the scales it was tested at
    assert len(list(tmp_path.glob("comp4_det_test_*.txt"))) == len(classes)
    with pytest.raises(UserError, match="data.classes"):
        check_classes(["a"], classes, "model.pt")


def test_eval_stage_with_a_model_writes_result_files_metrics_and_plot(synth_set, tmp_path, monkeypatch, capsys):
    from spp_det.stages import detect as detection_stage
    from spp_det.stages import evaluate as stage
    from spp_det.config import compose_config
    from spp_det.settings import RunSettings

    root, records, classes = synth_set
    monkeypatch.setattr(detection_stage, "load_detector", lambda cfg, scorer="svm": FakeDetector(records, classes))
    no_boxes = SimpleNamespace(get=lambda path, image: np.zeros((0, 4), np.float32), close=lambda: None)
    monkeypatch.setattr(stage, "proposal_stream", lambda recs, cfg: no_boxes)
    monkeypatch.chdir(tmp_path)
    overrides = ["data=synth", f"data.root={root}", "data.year=null", "eval.checkpoint=model.pt", "device=cpu"]
    assert stage.run(compose_config(overrides, stage="eval")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["map_voc07"] == pytest.approx(1.0) and metrics["coco"]["AP"] == pytest.approx(1.0)
    assert metrics["num_detections"] == sum(len(r.boxes) for r in records)
    assert {"proposals", "load_image", "svm", "total"} <= set(metrics["seconds_per_image"])
    assert len(list(tmp_path.glob("comp4_det_test_*.txt"))) == len(classes) and (tmp_path / "pr_curves.png").is_file()
    out = capsys.readouterr().out
    assert all(c in out for c in classes) and "AP07" in out
    wrong = [*overrides, f"data.classes=[{', '.join(reversed(classes))}]"]  # same names, other order
    with pytest.raises(UserError, match="the model detects classes"):
        stage.run(compose_config(wrong, stage="eval"))


def test_coco_size_ranges_without_objects_are_null_not_minus_100():
    """pycocotools' -1 for "no small objects" is None in metrics.json and n/a in the summary."""
    from spp_det.stages.evaluate import format_table, score_detections

    records = [record("a", [[10, 10, 190, 190]], [1], width=200, height=200)]  # one large object: no small or medium
    metrics = score_detections(records, ["one"], perfect(records), "test")
    assert metrics["coco"]["APs"] is None and metrics["coco"]["APm"] is None
    assert metrics["coco"]["APl"] == pytest.approx(1.0)
    summary = format_table(metrics)
    assert "APs n/a" in summary and "-100" not in summary


def test_voc_evaluations_print_the_published_per_class_ap_beside_their_own():
    from spp_det.evaluation import reference
    from spp_det.stages.evaluate import format_table

    # the reference row is the one the papers state: its mean is R-CNN's 58.5 (SPP-net's table reprints it)
    assert len(reference.RCNN_FC7_BB) == 20
    assert sum(reference.RCNN_FC7_BB.values()) / 20 == pytest.approx(58.5, abs=0.05)

    def metrics(classes):
        return {"ap_voc07": {c: 0.25 for c in classes}, "ap_voc10": {c: 0.25 for c in classes},
                "num_gt": {c: 2 for c in classes}, "num_det": {c: 5 for c in classes}, "map_voc07": 0.25, "map_voc10": 0.25}

    voc = format_table(metrics(reference.VOC_CLASSES)).splitlines()
    assert voc[0].split()[-1] == "R-CNN"
    assert voc[1].split() == ["aeroplane", "2", "5", "25.0", "25.0", "68.1"]
    assert voc[21].split()[-1] == "58.5" and "59.2" in voc[22]
    other = format_table(metrics(["raccoon"])).splitlines()
    assert "R-CNN" not in "\n".join(other) and other[1].split() == ["raccoon", "2", "5", "25.0", "25.0"]
