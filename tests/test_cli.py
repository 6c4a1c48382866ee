"""The CLI: help lists the stages, configs compose for every stage and preset, Hydra rejects unknown keys."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from spp_det.cli import STAGES, config_dir
from spp_det.runtime import compose_config, resolve_device

SPP_DET = [sys.executable, "-m", "spp_det.cli"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SPP_DET, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_stage():
    result = cli("--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert f"  {stage} " in result.stdout


def test_unknown_stage_exits_nonzero_with_usage():
    result = cli("trian")
    assert result.returncode == 2 and "unknown stage 'trian' (did you mean train" in result.stderr
    assert "usage" in result.stderr and not result.stdout


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_config_composes(stage):
    cfg = compose_config(stage=stage)
    assert cfg.stage == stage
    for section in ("data", "model", "proposals", "finetune", "svm", "bboxreg", "eval", "detect"):
        assert section in cfg


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.work_dir == f"runs/{experiment}"


@pytest.mark.parametrize("group", ["data", "model", "proposals"])
def test_every_group_option_composes(group):
    for option in group_options(group):
        compose_config([f"{group}={option}"])


def test_paper_defaults():
    cfg = compose_config(["~experiment"])  # the groups' values, without the default CPU recipe
    assert list(cfg.model.pyramid_levels) == [6, 3, 2, 1] and cfg.model.scales == [688]
    assert cfg.model.best_scale_area == 224 * 224
    assert (cfg.finetune.batch_size, cfg.finetune.fg_fraction, cfg.finetune.fg_iou) == (128, 0.25, 0.5)
    assert (cfg.svm.C, cfg.svm.pos_weight, cfg.svm.bias_multiplier, cfg.svm.feature_norm) == (0.001, 2.0, 10.0, 20.0)
    assert (cfg.eval.nms_iou, cfg.eval.max_per_image, cfg.eval.score_thresh) == (0.3, 100, -1.5)
    assert compose_config(["experiment=voc07_zf5_5scale"]).model.scales == [480, 576, 688, 864, 1200]


def test_unknown_key_is_rejected_by_hydra():
    with pytest.raises(ConfigCompositionException, match="Could not override 'model.widht'"):
        compose_config(["model.widht=2"])


def test_cli_cfg_job_prints_config_and_rejects_unknown_key(tmp_path):
    built = next((s for s in STAGES if (Path(__file__).parents[1] / (STAGES[s][0].replace(".", "/") + ".py")).exists()), None)
    if built is None:
        pytest.skip("no stage module exists yet")
    result = cli(built, "--cfg", "job", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"stage: {built}" in result.stdout and "pyramid_levels" in result.stdout
    # the usage line's order: overrides first, then --cfg job (argparse takes one run of overrides)
    result = cli(built, "device=cpu", "seed=7", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"stage: {built}" in result.stdout and "seed: 7" in result.stdout
    result = cli(built, "model.widht=2", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key model.widht (did you mean model.width" in result.stderr


def test_device_auto_falls_back_to_cpu_and_rejects_nonsense():
    import torch

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(Exception, match="device must be"):
        resolve_device("tpu")
