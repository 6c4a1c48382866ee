"""The model artifact (one weights_only-loadable file) and the test-time Detector."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from spp_det.errors import UserError
from spp_det.settings import RunSettings


# ``trained`` (tests/conftest.py): the tiny svm + bboxreg artifacts, trained once per session, in tmp_path/work


def test_artifact_round_trips_through_weights_only_load(trained, tmp_path):
    from spp_det import artifact
    from spp_det.stages.assemble import assemble

    path = assemble(RunSettings.of(trained))
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickles
    assert raw["format"] == artifact.FORMAT and raw["classes"] == ["disc", "block"]
    assert raw["config"]["weights"] is None and raw["scales"] == [96]
    assert raw["svm"]["weight"].shape == (2, 32) and raw["bboxreg"]["weight"].shape == (2, 3201, 4)
    loaded = artifact.load(path)
    assert torch.equal(loaded["svm"]["bias"], raw["svm"]["bias"])


def test_detector_loads_the_artifact_and_detects(trained, tmp_path):
    from spp_det.stages.assemble import assemble
    from spp_det.detection.detector import Detector

    detector = Detector.load(assemble(RunSettings.of(trained)), "cpu")
    assert detector.classes == ["disc", "block"]
    image = np.full((96, 128, 3), 40, np.uint8)
    image[20:60, 10:50] = (220, 60, 60)
    proposals = np.array([[10, 20, 50, 60], [8, 18, 52, 63], [70, 10, 120, 80], [0, 0, 128, 96]], np.float32)
    timings: dict[str, float] = {}
    dets = detector.detect(image, proposals, score_thresh=-1e9, nms_iou=1.0, max_per_image=100, timings=timings)
    assert dets.boxes.shape == (8, 4) and dets.scores.shape == (8,) and dets.labels.shape == (8,)
    assert set(dets.labels.tolist()) == {1, 2}
    assert np.all(np.diff(dets.scores) <= 0)  # sorted by score
    assert set(timings) == {"conv5", "pool", "fc", "svm", "bboxreg", "nms"}
    # box regression moves boxes but keeps them in the image
    assert dets.boxes[:, 0::2].min() >= 0 and dets.boxes[:, 0::2].max() <= 128
    assert dets.boxes[:, 1::2].max() <= 96
    # the scores are the SVMs' on scaled fc7: recompute one by hand
    scores, _ = detector.score_windows(image, proposals, bbox_reg=False)
    with torch.no_grad():
        _, fc7 = detector.model.features(image, proposals)
    expected = fc7 * detector.svm_scale @ detector.svm_weight.T + detector.svm_bias
    assert torch.allclose(scores, expected, atol=1e-4)
    # without box regression the boxes are the proposals; max_per_image and score_thresh apply
    plain = detector.detect(image, proposals, -1e9, 1.0, 3, bbox_reg=False)
    assert len(plain) == 3 and all(any(np.allclose(b, p) for p in proposals) for b in plain.boxes)
    assert len(detector.detect(image, proposals, 1e9, 0.3, 100)) == 0
    assert len(detector.detect(image, np.zeros((0, 4), np.float32), -1e9, 0.3, 100)) == 0


def test_test_scales_replace_the_training_scales_at_test_time(trained):
    from spp_det import artifact
    from spp_det.stages.assemble import assemble
    from spp_det.detection.detector import Detector

    path = assemble(RunSettings.of(trained))
    assert Detector.load(path, "cpu").model.scales == [96]  # as trained
    given = Detector.load(path, "cpu", test_scales=[64, 96], test_max_size=300).model
    assert given.scales == [64, 96] and given.max_size == 300
    stored = torch.load(path, weights_only=True)
    stored["config"].update(test_scales=[96, 128], test_max_size=None)
    torch.save(stored, path)
    from_artifact = Detector.load(path, "cpu").model
    assert from_artifact.scales == [96, 128] and from_artifact.max_size == trained.model.max_size
    assert Detector.load(path, "cpu", test_scales=[80]).model.scales == [80]  # the caller's first


def test_detect_pair_equals_detect_with_and_without_box_regression(trained):
    from spp_det.stages.assemble import assemble
    from spp_det.detection.detector import Detector

    detector = Detector.load(assemble(RunSettings.of(trained)), "cpu")
    image = np.full((96, 128, 3), 40, np.uint8)
    image[20:60, 10:50] = (220, 60, 60)
    proposals = np.array([[10, 20, 50, 60], [8, 18, 52, 63], [70, 10, 120, 80]], np.float32)
    with_reg, without = detector.detect_pair(image, proposals, -1e9, 0.3, 100)
    for got, bbox_reg in ((with_reg, True), (without, False)):
        expected = detector.detect(image, proposals, -1e9, 0.3, 100, bbox_reg=bbox_reg)
        assert np.allclose(got.boxes, expected.boxes) and np.allclose(got.scores, expected.scores)
        assert np.array_equal(got.labels, expected.labels)
    assert not np.allclose(with_reg.boxes, without.boxes)  # the regressors moved something


def test_detection_builds_no_autograd_graph(trained):
    """Inference keeps no graph: with one, eval's memory grew by about 1 GB per image (OOM on real photos)."""
    from spp_det.stages.assemble import assemble
    from spp_det.detection.detector import Detector

    detector = Detector.load(assemble(RunSettings.of(trained)), "cpu")
    seen, fc7 = [], detector.model.fc7
    detector.model.fc7 = lambda pool5: (seen.append(torch.is_grad_enabled()), fc7(pool5))[1]
    image = np.full((96, 128, 3), 40, np.uint8)
    proposals = np.array([[10, 20, 50, 60], [70, 10, 120, 80]], np.float32)
    detector.detect(image, proposals, -1e9)
    detector.detect_pair(image, proposals, -1e9)
    detector.score_windows(image, proposals)
    assert len(seen) == 3 and not any(seen)


def test_softmax_scorer_uses_the_fine_tuned_fc8(trained):
    from spp_det.stages.assemble import assemble
    from spp_det.detection.detector import Detector

    detector = Detector.load(assemble(RunSettings.of(trained)), "cpu", scorer="softmax")
    image = np.full((96, 128, 3), 40, np.uint8)
    scores, _ = detector.score_windows(image, np.array([[10, 20, 50, 60]], np.float32), bbox_reg=False)
    assert scores.shape == (1, 2) and 0 <= float(scores.min()) and float(scores.sum()) < 1


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    from spp_det import artifact, io

    with pytest.raises(UserError, match="not found"):
        artifact.load(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a spp-det model.pt"):
        artifact.load(tmp_path / "bad.pt")
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "pickle.pt")  # loads only unsafely
    with pytest.raises(UserError, match="not a spp-det model.pt") as error:
        artifact.load(tmp_path / "pickle.pt")
    assert "weights_only" not in str(error.value) and "trust" not in str(error.value)  # never the unsafe advice
    io.save_torch({"state_dict": {}, "meta": {}}, tmp_path / "stage.pt")
    with pytest.raises(UserError, match="not a spp-det model"):
        artifact.load(tmp_path / "stage.pt")
    io.save_torch({"format": artifact.FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="version"):
        artifact.load(tmp_path / "future.pt")


def test_stage_artifacts_of_other_classes_are_refused(trained):
    from omegaconf import open_dict

    from spp_det.stages.assemble import assemble

    with open_dict(trained):
        trained.data.classes = ["disc", "ring"]
    with pytest.raises(UserError, match="classes"):
        assemble(RunSettings.of(trained))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask, mode):
    """model.pt, metrics.json, reports: readable by whoever the umask lets read them (not mkstemp's 0600)."""
    from spp_det import io

    old = os.umask(umask)
    try:
        io.save_torch({"x": torch.zeros(1)}, tmp_path / "model.pt")
        io.write_json({"map": 1.0}, tmp_path / "metrics.json")
        with io.atomic_path(tmp_path / "report.html") as tmp:
            tmp.write_text("<html></html>")
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("model.pt", "metrics.json", "report.html", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.pt", "plain.txt", "report.html"]
