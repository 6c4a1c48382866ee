"""`spp-det export` and `detect.runtime=onnxruntime`: the exported detector gives PyTorch's detections.

The export tests need the optional `onnx` extra (pip install -e '.[onnx]'; `make setup` installs it)
and skip visibly without it. The numpy pyramid pooling needs nothing extra.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_det.ops import spatial_pyramid_pool
from spp_det.ops.spp_numpy import spatial_pyramid_pool_numpy

SCORE_TOL, BOX_TOL = 1e-3, 1.0   # the parity tolerances (docs/export.md, "Use the model elsewhere")


def needs_onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} not installed: pip install -e '.[onnx]'")


@pytest.mark.parametrize("shape", [(3, 13, 17), (4, 5, 7), (2, 1, 1), (2, 31, 9), (5, 43, 57)])
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 3, 1), (7,), (1, 2, 6)])
def test_numpy_pyramid_pooling_equals_the_torch_op_bit_for_bit(shape, levels):
    """Negative maps on purpose: EfficientNet's conv5 is mostly negative (a linear bottleneck)."""
    rng = np.random.default_rng(sum(shape) + sum(levels))
    fmap = (rng.standard_normal(shape) - 1.0).astype(np.float32)
    C, H, W = shape
    x1, y1 = rng.integers(0, W, 200), rng.integers(0, H, 200)
    x2, y2 = np.minimum(x1 + rng.integers(0, W, 200), W - 1), np.minimum(y1 + rng.integers(0, H, 200), H - 1)
    cells = np.stack([x1, y1, x2, y2], axis=1)
    want = spatial_pyramid_pool(torch.from_numpy(fmap)[None], torch.from_numpy(np.c_[np.zeros(200, int), cells]), levels)
    got = spatial_pyramid_pool_numpy(fmap, cells, levels)
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.numpy())


def test_numpy_pyramid_pooling_refuses_cells_outside_the_map_and_takes_no_windows():
    fmap = np.zeros((2, 4, 5), np.float32)
    with pytest.raises(ValueError, match="inside the 4x5 map"):
        spatial_pyramid_pool_numpy(fmap, np.array([[0, 0, 5, 3]]))
    assert spatial_pyramid_pool_numpy(fmap, np.zeros((0, 4), int)).shape == (0, 2 * 50)


TINY_MODEL = ["~experiment", "model=zf5_narrow", "model.width=0.125", "model.fc_dim=64", "model.scales=[96,160]",
              "model.max_size=300", "device=cpu"]
CLASSES = ["disc", "block", "ring"]


def tiny_artifact() -> dict:
    """A model.pt's content (spp_det.artifact): a random narrow ZF-5 at two scales with SVMs, fc8 and box
    regressors (export and runtime do not depend on the values)."""
    from spp_det import artifact
    from spp_det.config import compose_config
    from spp_det.model import build_model
    from spp_det.model.build import without_weights

    cfg = compose_config(TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    k, gen = len(CLASSES), torch.Generator().manual_seed(1)
    return {"format": artifact.FORMAT, "version": artifact.VERSION, "classes": CLASSES,
            "config": without_weights(cfg.model), "scales": [96, 160], "meta": {}, "state_dict": model.state_dict(),
            "fc8": {"weight": torch.randn(k + 1, 64, generator=gen), "bias": torch.zeros(k + 1)},
            "svm": {"weight": torch.randn(k, 64, generator=gen), "bias": torch.randn(k, generator=gen) * 0.1,
                    "feature_scale": 2.0},
            "bboxreg": {"weight": torch.randn(k, model.pool5_dim + 1, 4, generator=gen) * 1e-3, "feature_scale": 0.5}}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from spp_det.io import save_torch

    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_torch(tiny_artifact(), path)
    return path


def tiny_detector(path: Path):
    from spp_det.detection.detector import Detector

    return Detector.load(path, "cpu")


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory):
    """The tiny detector and its export folder, written by `spp-det export` (the stage, verify on)."""
    needs_onnx()
    from spp_det.config import compose_config
    from spp_det.stages import export

    folder = tmp_path_factory.mktemp("export") / "onnx"
    cfg = compose_config([f"export.checkpoint={model_file}", f"export.output={folder}"], stage="export")
    assert export.run(cfg) == 0
    return tiny_detector(model_file), folder


def test_export_writes_two_graphs_and_the_manifest_the_runtime_needs(exported):
    import onnx

    detector, folder = exported
    manifest = json.loads((folder / "spp_det_onnx.json").read_text())
    assert manifest["format"] == "spp-det-onnx" and manifest["classes"] == CLASSES
    assert manifest["model"]["scales"] == [96, 160] and manifest["model"]["pyramid_levels"] == [6, 3, 2, 1]
    assert manifest["model"]["stride"] == 16 and manifest["model"]["centre0"] == detector.model.backbone.centre0
    assert manifest["head"]["outputs"] == {"svm": "svm_scores", "softmax": "softmax_scores", "deltas": "box_deltas"}
    head = onnx.load(str(folder / "head.onnx"))
    onnx.checker.check_model(head)
    assert [o.name for o in head.graph.output] == ["svm_scores", "softmax_scores", "box_deltas"]
    conv5 = onnx.load(str(folder / "conv5.onnx"))
    dims = conv5.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][:2] == [1, 3] and all(d.dim_param for d in dims[2:])


def image_and_windows(seed, height, width, count):
    from spp_det.stages.bench import random_windows

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), random_windows(height, width, count, rng)


@pytest.mark.parametrize("scorer", ["svm", "softmax"])
def test_onnxruntime_scores_and_boxes_equal_pytorch_within_the_tolerances(exported, scorer):
    """Every output of the head (SVM, fc8 softmax, box deltas) at two scales, on images of any size."""
    from spp_det.detection.onnx_detector import OnnxDetector

    detector, folder = exported
    detector.scorer = scorer
    runtime = OnnxDetector(folder, scorer=scorer, window_batch=70)  # chunks of another size than PyTorch's
    try:
        for seed, (h, w) in enumerate([(120, 170), (301, 207), (20, 30)]):  # 20 x 30: padded to min_input
            image, windows = image_and_windows(seed, h, w, 150)
            s_torch, b_torch = detector.score_windows(image, windows)
            s_onnx, b_onnx = runtime.score_windows(image, windows)
            assert s_onnx.shape == s_torch.shape and b_onnx.shape == b_torch.shape == (150, 3, 4)
            assert float((s_onnx - s_torch).abs().max()) < SCORE_TOL
            assert float((b_onnx - b_torch).abs().max()) < BOX_TOL
            assert float(s_torch.std()) > 100 * SCORE_TOL  # the scores differ between windows: a real comparison
    finally:
        detector.scorer = "svm"


def test_onnxruntime_detections_equal_pytorch_on_voc_photos(exported, voc_sample):
    """The whole test procedure (threshold, per-class NMS, top 100) on real photos of the VOC sample."""
    from spp_det.data.images import read_image
    from spp_det.detection.onnx_detector import OnnxDetector

    detector, folder = exported
    runtime = OnnxDetector(folder)
    photos = sorted((voc_sample / "VOC2012" / "JPEGImages").glob("*.jpg"))[:3]
    rng = np.random.default_rng(0)
    from spp_det.stages.bench import random_windows

    total = 0
    for photo in photos:
        image = read_image(photo)
        windows = random_windows(image.shape[0], image.shape[1], 300, rng)
        want = detector.detect(image, windows, score_thresh=0.0, nms_iou=0.3, max_per_image=100)
        got = runtime.detect(image, windows, score_thresh=0.0, nms_iou=0.3, max_per_image=100)
        assert len(got) == len(want)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.scores, want.scores, atol=SCORE_TOL)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=BOX_TOL)
        total += len(want)
    assert total > 10


def test_a_folder_that_is_not_an_export_is_a_clear_error(tmp_path):
    from spp_det.artifact import load_export
    from spp_det.errors import UserError

    with pytest.raises(UserError, match="no exported detector there"):
        load_export(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="a model file, not an exported folder"):
        load_export(tmp_path / "model.pt")
    (tmp_path / "spp_det_onnx.json").write_text('{"format": "spp-det-onnx", "version": 1, "graphs": {"conv5": "c.onnx"}}')
    with pytest.raises(UserError, match="c.onnx named by spp_det_onnx.json are missing"):
        load_export(tmp_path)


def test_detect_writes_the_same_files_with_either_runtime(exported, model_file, tmp_path, monkeypatch):
    """`spp-det detect detect.runtime=onnxruntime detect.checkpoint=DIR`: the jsonl of the PyTorch run."""
    from PIL import Image

    from spp_det.config import compose_config
    from spp_det.stages import detect

    _, folder = exported
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (90, 120), "sub/b.jpg": (150, 110)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(source / name, quality=95)

    def windows(path, image, cfg, prefetch=None):  # no selective search: the same random windows per image
        from spp_det.stages.bench import random_windows

        return random_windows(image.shape[0], image.shape[1], 120, np.random.default_rng(len(path.name)))

    monkeypatch.setattr(detect, "proposals_for_file", windows)
    lines = {}
    for runtime, checkpoint in (("torch", model_file), ("onnxruntime", folder)):
        out = tmp_path / runtime
        cfg = compose_config([f"detect.source={source}", f"detect.output={out}", f"detect.checkpoint={checkpoint}",
                              f"detect.runtime={runtime}", "detect.score_thresh=-0.5", "device=cpu"], stage="detect")
        assert detect.run(cfg) == 0
        lines[runtime] = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    torch_lines, onnx_lines = lines["torch"], lines["onnxruntime"]
    assert len(torch_lines) == len(onnx_lines) > 5
    for a, b in zip(torch_lines, onnx_lines):
        assert (a["file"], a["class"]) == (b["file"], b["class"])
        assert abs(a["score"] - b["score"]) < SCORE_TOL and max(abs(p - q) for p, q in zip(a["box"], b["box"])) < BOX_TOL


def test_an_export_that_fails_its_check_leaves_no_folder_a_later_run_would_trust(model_file, tmp_path, monkeypatch):
    needs_onnx()
    from spp_det.artifact import load_export
    from spp_det.config import compose_config
    from spp_det.errors import UserError
    from spp_det.stages import export

    monkeypatch.setattr(export, "verify", lambda detector, folder: {"scores": 0.5, "boxes": 0.0})
    output = tmp_path / "refused"
    with pytest.raises(UserError, match="do not reproduce.*nothing was written"):
        export.run(compose_config([f"export.checkpoint={model_file}", f"export.output={output}"], stage="export"))
    assert list(output.iterdir()) == []
    with pytest.raises(UserError, match="no exported detector there"):
        load_export(output)


def test_export_fc_rank_writes_the_truncated_svd_that_pytorch_runs_with_eval_fc_rank(model_file, tmp_path):
    """export.fc_rank: the head graph computes fc6/fc7 as their truncated SVDs, the same scores as PyTorch's
    detector with that fc_rank (not the full layers'), and the manifest says so."""
    needs_onnx()
    from spp_det.config import compose_config
    from spp_det.detection.detector import Detector
    from spp_det.detection.onnx_detector import OnnxDetector
    from spp_det.stages import export

    folder = tmp_path / "svd"
    assert export.run(compose_config([f"export.checkpoint={model_file}", f"export.output={folder}",
                                      "export.fc_rank=[8,4]"], stage="export")) == 0
    assert json.loads((folder / "spp_det_onnx.json").read_text())["source"]["fc_rank"] == [8, 4]
    image, windows = image_and_windows(3, 140, 180, 120)
    svd, full = Detector.load(model_file, "cpu", fc_rank=[8, 4]), tiny_detector(model_file)
    s_onnx, _ = OnnxDetector(folder).score_windows(image, windows)
    s_svd, _ = svd.score_windows(image, windows)
    s_full, _ = full.score_windows(image, windows)
    assert float((s_onnx - s_svd).abs().max()) < SCORE_TOL
    assert float((s_onnx - s_full).abs().max()) > 100 * SCORE_TOL  # rank 8 / 4 of 64-d layers: not the full head


def test_export_and_onnxruntime_settings_are_checked_before_any_work(model_file, tmp_path):
    needs_onnx()
    from spp_det.config import compose_config
    from spp_det.errors import UserError
    from spp_det.settings import DetectSettings
    from spp_det.stages import export

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="a file is there, not a folder"):
        export.run(compose_config([f"export.checkpoint={model_file}", f"export.output={tmp_path / 'file'}"],
                                  stage="export"))
    with pytest.raises(UserError, match="no model file there"):
        export.run(compose_config([f"export.checkpoint={tmp_path / 'none.pt'}", f"export.output={tmp_path / 'o'}"],
                                  stage="export"))
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "o").exists()
    cfg = compose_config(["detect.source=x", "detect.runtime=onnxruntime", "detect.precision=bf16"], stage="detect")
    with pytest.raises(UserError, match="precision must be fp32"):
        DetectSettings.of(cfg.detect)
