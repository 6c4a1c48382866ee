"""Declared stages: a settings key follows from what the stage declares it reads and consumes.

A key that only eval / detect / bench read (or the proposals stage's export) changes no trained
stage's settings key and retrains nothing under ``spp-det train``; a key a stage reads reruns it.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spp_det.config import compose_config
from spp_det.settings import RunSettings
from spp_det.stages import STAGES, bboxreg, declare, finetune, heads, pretrain, stage, svm

# keys no training stage reads: test time (eval, detect), benchmarks, where proposals are exported
NOT_TRAINING = {"eval.scales": "[64,96]", "eval.max_size": 300, "eval.checkpoint": "x.pt", "eval.nms_iou": 0.4,
                "detect.scales": "[80]", "detect.checkpoint": "y.pt", "bench.rcnn_batch": 8, "bench.rcnn_context": 8,
                "bench.rcnn_input": 112, "data.test_split": "val", "proposals.export": "boxes.npz",
                "proposals.split": "val", "data.allow_split_overlap": "true"}


def keys(overrides: dict, tmp_path: Path) -> dict[str, str]:
    """Every trained stage's settings key under ``overrides`` (a stand-in finetune.pt and backbone)."""
    rs = RunSettings.of(compose_config(["experiment=demo_zf5", *(f"{k}={v}" for k, v in overrides.items())]))
    (tmp_path / "finetune.pt").write_bytes(b"fine-tuned weights")
    (tmp_path / "pretrain.pt").write_bytes(b"backbone weights")
    return {"pretrain_crops": pretrain.settings_key(rs, pretrain.CROPS),
            "pretrain_windows": pretrain.settings_key(rs, pretrain.WINDOWS),
            "finetune": finetune.settings_key(rs, tmp_path / "pretrain.pt"),
            "svm": heads.settings_key(rs, svm.KEY, tmp_path / "finetune.pt"),
            "bboxreg": heads.settings_key(rs, bboxreg.KEY, tmp_path / "finetune.pt")}


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
    rs = RunSettings.of(cfg)
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    a.write_bytes(b"one")
    b.write_bytes(b"one")
    c.write_bytes(b"two")
    assert heads.settings_key(rs, svm.KEY, a) == heads.settings_key(rs, svm.KEY, b) != heads.settings_key(rs, svm.KEY, c)
    assert finetune.settings_key(rs, a) == finetune.settings_key(rs, b) != finetune.settings_key(rs, None)


def test_a_stage_must_be_given_exactly_what_it_declares_it_consumes():
    cfg = compose_config([])
    with pytest.raises(ValueError, match="consumes"):
        declare.settings_key(cfg, svm.KEY, {"finetune": None})  # proposals missing
    with pytest.raises(ValueError, match="consumes"):
        declare.settings_key(cfg, svm.KEY, {"finetune": None, "proposals": None, "pretrain": None})


def test_an_old_key_spelling_names_the_new_one(tmp_path):
    from spp_det.errors import UserError

    with pytest.raises(UserError, match="eval.scales"):
        compose_config(["model.test_scales=[96]"])
    from conftest import spp_det_cli

    result = spp_det_cli("detect", "model.checkpoint=m.pt", "bench.windows=5", "model.rcnn_input=112", cwd=tmp_path)
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


def test_the_architecture_tables_are_generated_from_the_declarations():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    for table in (declare.stage_table(STAGES), declare.key_table(STAGES)):
        assert table in doc, f"docs/ARCHITECTURE.md lacks (or has another version of) this table:\n{table}"
    assert "| finetune | `spp_det/stages/finetune.py` |" in declare.stage_table(STAGES)
    assert "| pretrain_windows | `pretrain.pt` |" in declare.key_table(STAGES)


def test_usage_and_stage_help_come_from_the_declarations():
    from spp_det.cli import usage
    from spp_det.cli_help import stage_help
    from spp_det.config import compose

    listed = [line.split()[0] for line in usage().splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert listed == [s.name for s in STAGES]
    changed = dataclasses.replace(stage("svm"), help="a changed line", common=("seed", "svm.C"))
    lines = stage_help(changed, compose("svm", [], hydra=True)).splitlines()
    assert lines[1] == "a changed line."
    common = lines.index("Common overrides (current value, then what it means):")
    assert [line.split("=")[0].strip() for line in lines[common + 1:common + 3]] == ["seed", "svm.C"]
    assert "Also reads the groups model" in " ".join(lines)  # the declared groups after the own one


def test_the_lock_and_the_output_checks_come_from_the_declarations(tmp_path):
    from spp_det.artifact import RUN_LOCK
    from spp_det.cli import claim_outputs, output_locations

    cfg = compose_config([f"work_dir={tmp_path / 'work'}", f"cache_dir={tmp_path / 'cache'}"], stage="svm")
    for declared in STAGES:
        places = [what for _, what, _ in output_locations(declared, cfg)]
        assert ("the stage artifacts (work_dir)" in places) == declared.lock, declared.name
        assert ("the proposals and conv5 caches (cache_dir)" in places) == declared.caches, declared.name
    assert claim_outputs(dataclasses.replace(stage("svm"), lock=False), cfg, []) is None
    lock = claim_outputs(stage("svm"), cfg, [])
    assert lock is not None and (tmp_path / "work" / RUN_LOCK).is_file()


def test_the_split_check_comes_from_the_declarations(tmp_path):
    from test_cli import leaky_dataset

    from spp_det.cli import preflight
    from spp_det.data.voc import DatasetError

    data = leaky_dataset(tmp_path / "voc", ["im2", "im3"])
    cfg = compose_config([f"data.root={data}", "data.year=null", "data.classes=[disc]"], stage="features")
    with pytest.raises(DatasetError, match="share 2 images"):
        preflight(stage("features"), cfg)
    preflight(dataclasses.replace(stage("features"), split_check=False), cfg)  # declared off: no check
    assert [s.name for s in STAGES if s.split_check] == ["features", "finetune", "svm", "bboxreg", "train", "eval"]


class Recorded(declare.Stage):
    """A declaration whose run records its name in ``calls`` and returns ``outcome``."""

    def function(self):
        return lambda cfg: CALLS.append(self.name) or OUTCOMES.get(self.name)


CALLS: list[str] = []
OUTCOMES = {"svm": declare.Skipped("current"), "pretrain": declare.Skipped("pretrain.enabled=false")}


def test_train_runs_the_declared_stages_in_order_and_reports_what_they_return(tmp_path, monkeypatch):
    from spp_det.stages import train

    order = [s for s in STAGES if s.in_train]
    assert [s.name for s in order] == ["proposals", "pretrain", "features", "finetune", "svm", "bboxreg"]
    fakes = tuple(Recorded(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}) for s in STAGES)
    monkeypatch.setattr(train, "STAGES", fakes[::-1])  # the list's order is train's order
    monkeypatch.setattr(train, "assemble", lambda cfg: tmp_path / "model.pt")
    CALLS.clear()
    cfg = compose_config([f"work_dir={tmp_path}", "allow_random_backbone=true"], stage="train")
    assert train.run(cfg) == 0
    assert CALLS == [s.name for s in order][::-1]
    statuses = {r["stage"]: r["status"] for r in json.loads((tmp_path / "train_summary.json").read_text())}
    assert statuses == {"proposals": "ran", "pretrain": "skipped (pretrain.enabled=false)", "features": "ran",
                        "finetune": "ran", "svm": "skipped (current)", "bboxreg": "ran", "model": "ran"}


def test_the_backbone_source_follows_the_config_not_the_files_in_work_dir(tmp_path):
    from spp_det.errors import UserError
    from spp_det.stages.start import backbone_source, describe_backbone

    def cfg(*extra):
        return RunSettings.of(compose_config(["model=zf5_narrow", f"work_dir={tmp_path}", *extra]))

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
