"""Declared stages: a settings key follows from what the stage declares it reads and consumes.

A key that only eval / detect / bench read (or the proposals stage's export) changes no trained
stage's settings key and retrains nothing under ``spp-det train``; a key a stage reads reruns it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spp_det.config import compose_config
from spp_det.stages import bboxreg, declare, finetune, pretrain, svm

# keys no training stage reads: test time (eval, detect), benchmarks, where proposals are exported
NOT_TRAINING = {"eval.scales": "[64,96]", "eval.max_size": 300, "eval.checkpoint": "x.pt", "eval.nms_iou": 0.4,
                "detect.scales": "[80]", "detect.checkpoint": "y.pt", "bench.rcnn_batch": 8, "bench.rcnn_context": 8,
                "bench.rcnn_input": 112, "data.test_split": "val", "proposals.export": "boxes.npz",
                "proposals.split": "val", "data.allow_split_overlap": "true"}


def keys(overrides: dict, tmp_path: Path) -> dict[str, str]:
    """Every trained stage's settings key under ``overrides`` (a stand-in finetune.pt and backbone)."""
    cfg = compose_config(["experiment=demo_zf5", *(f"{k}={v}" for k, v in overrides.items())])
    (tmp_path / "finetune.pt").write_bytes(b"fine-tuned weights")
    (tmp_path / "pretrain.pt").write_bytes(b"backbone weights")
    return {"pretrain_crops": pretrain.settings_key(cfg, pretrain.CROPS),
            "pretrain_windows": pretrain.settings_key(cfg, pretrain.WINDOWS),
            "finetune": finetune.settings_key(cfg, tmp_path / "pretrain.pt"),
            "svm": svm.settings_key(cfg, tmp_path / "finetune.pt"),
            "bboxreg": bboxreg.settings_key(cfg, tmp_path / "finetune.pt")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("declare")


@pytest.fixture(scope="module")
def base(inputs) -> dict[str, str]:
    return keys({}, inputs)


@pytest.mark.parametrize("key", sorted(NOT_TRAINING))
def test_a_key_no_training_stage_reads_changes_no_settings_key(key, inputs, base):
    assert keys({key: NOT_TRAINING[key]}, inputs) == base


@pytest.mark.parametrize("key, value, changed", [
    ("finetune.lr", 0.01, {"finetune"}),
    ("svm.C", 1.0, {"svm"}),
    ("bboxreg.lam", 10, {"bboxreg"}),
    ("pretrain.epochs", 3, {"pretrain_crops", "pretrain_windows"}),
    ("pretrain.iterations", 30, {"pretrain_windows"}),  # the window phase's; the crop phase stays current
    ("model.fc_dim", 64, {"pretrain_crops", "pretrain_windows", "finetune", "svm", "bboxreg"}),
    ("model.scales", "[96]", {"pretrain_windows", "finetune", "svm", "bboxreg"}),  # crops never pool windows
    ("data.flip", False, {"finetune", "svm", "bboxreg"}),
    ("data.train_split", "val", {"pretrain_crops", "pretrain_windows", "finetune", "svm", "bboxreg"}),
    ("proposals.max_boxes", 100, {"pretrain_windows", "finetune", "svm", "bboxreg"}),  # the boxes change
    ("seed", 1, {"pretrain_crops", "pretrain_windows", "finetune", "svm", "bboxreg"}),
])
def test_a_key_a_stage_reads_changes_exactly_its_readers_keys(key, value, changed, inputs, base):
    other = keys({key: value}, inputs)
    assert {stage for stage in base if base[stage] != other[stage]} == changed


def test_consumed_artifacts_count_by_content_not_by_name(tmp_path):
    cfg = compose_config(["experiment=demo_zf5"])
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    a.write_bytes(b"one")
    b.write_bytes(b"one")
    c.write_bytes(b"two")
    assert svm.settings_key(cfg, a) == svm.settings_key(cfg, b) != svm.settings_key(cfg, c)
    assert finetune.settings_key(cfg, a) == finetune.settings_key(cfg, b) != finetune.settings_key(cfg, None)


def test_a_stage_must_be_given_exactly_what_it_declares_it_consumes():
    cfg = compose_config([])
    with pytest.raises(ValueError, match="consumes"):
        declare.settings_key(cfg, svm.STAGE, {"finetune": None})  # proposals missing
    with pytest.raises(ValueError, match="consumes"):
        declare.settings_key(cfg, svm.STAGE, {"finetune": None, "proposals": None, "pretrain": None})


def test_an_old_key_spelling_names_the_new_one(tmp_path):
    from spp_det.errors import UserError

    with pytest.raises(UserError, match="eval.scales"):
        compose_config(["model.test_scales=[96]"])
    result = subprocess.run([sys.executable, "-m", "spp_det", "detect", "model.checkpoint=m.pt", "bench.windows=5",
                             "model.rcnn_input=112"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "model.checkpoint has moved: use eval.checkpoint (spp-det detect: detect.checkpoint" in result.stderr
    assert "model.rcnn_input has moved: use bench.rcnn_input" in result.stderr


def train(root: Path, *extra: str) -> dict[str, str]:
    """``spp-det train`` on the tiny set; returns each stage's status from train_summary.json."""
    from test_distributed import TINY

    args = [sys.executable, "-m", "spp_det", "train", *TINY, f"data.root={root / 'synth'}",
            f"cache_dir={root / 'cache'}", f"work_dir={root / 'work'}", *extra]
    result = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return {r["stage"]: r["status"] for r in json.loads((root / "work" / "train_summary.json").read_text())}


@pytest.mark.slow  # three `spp-det train` runs (~1 min); the keys themselves are checked above in the default run
def test_train_retrains_nothing_for_test_export_or_bench_keys_and_reruns_what_reads_a_changed_key(tmp_path):
    from test_distributed import CLASSES, SYNTH

    from spp_det.data.synth import write_synthetic

    write_synthetic(tmp_path / "synth", SYNTH, CLASSES, progress=False)
    first = train(tmp_path)
    assert all(first[s] == "ran" for s in ("finetune", "svm", "bboxreg")), first
    again = train(tmp_path, "eval.scales=[64,96]", "eval.max_size=300", "detect.scales=[80]", "bench.rcnn_batch=8",
                  "bench.rcnn_context=8", "data.test_split=val", f"proposals.export={tmp_path / 'boxes.npz'}")
    assert all(again[s] == "skipped (current)" for s in ("finetune", "svm", "bboxreg")), again
    assert (tmp_path / "boxes.npz").is_file()  # the proposals stage did export
    svm_only = train(tmp_path, "svm.C=0.5")
    assert svm_only["svm"] == "ran" and svm_only["finetune"] == svm_only["bboxreg"] == "skipped (current)", svm_only


def test_the_architecture_doc_shows_every_declared_stage_as_declared():
    import importlib

    doc = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    stages = [pretrain.CROPS, pretrain.WINDOWS, finetune.STAGE, svm.STAGE, bboxreg.STAGE]
    for module in ("spp_det.stages.proposals", "spp_det.stages.features", "spp_det.stages.assemble",
                   "spp_det.stages.evaluate", "spp_det.stages.detect", "spp_det.stages.export"):
        stages.append(importlib.import_module(module).STAGE)
    missing = [declare.table_row(s) for s in stages if declare.table_row(s) not in doc]
    assert not missing, "docs/ARCHITECTURE.md lacks (or has another version of) these rows:\n" + "\n".join(missing)


def test_the_backbone_source_follows_the_config_not_the_files_in_work_dir(tmp_path):
    from spp_det.errors import UserError
    from spp_det.stages.start import backbone_source, describe_backbone

    def cfg(*extra):
        return compose_config(["model=zf5_narrow", f"work_dir={tmp_path}", *extra])

    with pytest.raises(UserError, match="spp-det pretrain"):  # pretraining configured but not run: said so
        backbone_source(cfg("pretrain.enabled=true"))
    (tmp_path / "pretrain.pt").write_bytes(b"left by an earlier run")
    assert backbone_source(cfg("pretrain.enabled=true")) == tmp_path / "pretrain.pt"
    assert backbone_source(cfg("pretrain.enabled=false")) is None  # not configured: the file is not used
    assert backbone_source(cfg("pretrain.enabled=true", "model.weights=IMAGENET1K_V1")) is None
    given = tmp_path / "mine.pt"
    given.write_bytes(b"")
    assert backbone_source(cfg("pretrain.enabled=true", f"model.backbone_checkpoint={given}")) == given
    assert describe_backbone(cfg("model.weights=IMAGENET1K_V1"), None) == "model.weights=IMAGENET1K_V1"
    assert describe_backbone(cfg(), None) == "random initialisation"
