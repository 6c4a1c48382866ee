"""The CLI: help lists the stages, configs compose for every stage and preset, Hydra rejects unknown keys."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
from hydra.errors import ConfigCompositionException

from spp_det.config import config_dir
from spp_det.errors import UserError
from spp_det.config import compose_config
from spp_det.settings import DataSettings
from spp_det.runtime import resolve_device
from spp_det.stages import STAGES

from conftest import spp_det_cli as cli  # `spp-det ARGS` in this process (spp_det.cli.main)


def test_help_lists_every_stage():
    result = cli("--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert f"  {stage.name} " in result.stdout and stage.help in result.stdout


def test_unknown_stage_exits_nonzero_with_usage():
    result = cli("trian")
    assert result.returncode == 2 and "unknown stage 'trian' (did you mean train" in result.stderr
    assert "usage" in result.stderr and not result.stdout


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_every_stage_config_composes(stage):
    cfg = compose_config(stage=stage)
    assert cfg.stage == stage
    for section in ("data", "model", "proposals", "finetune", "svm", "bboxreg", "eval", "detect"):
        assert section in cfg


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.work_dir == f"runs/{experiment}"


def leaves(node: dict, prefix: str = "") -> dict:
    """``{dotted key: value}`` of a nested dict's leaves (a list is one leaf)."""
    out = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("group", ["data", "model", "proposals"])
def test_every_group_option_composes_with_its_own_values(group):
    """Each option composes with the default recipe, and the group then holds every value the option's
    file sets (but the keys the recipe itself sets for the group, and the ones it leaves to the user)."""
    from omegaconf import OmegaConf

    def raw(node) -> dict:
        return OmegaConf.to_container(node, resolve=False) if node is not None else {}

    recipe_keys = set(leaves(raw(OmegaConf.load(config_dir() / "experiment" / "default.yaml").get(group))))
    for option in group_options(group):
        own = raw(OmegaConf.load(config_dir() / group / f"{option}.yaml"))
        own.pop("defaults", None)
        composed = leaves(raw(compose_config([f"{group}={option}"])[group]))
        expected = {k: v for k, v in leaves(own).items() if k not in recipe_keys and v != "???"}  # ???: to be given
        assert expected and {k: composed.get(k) for k in expected} == expected, f"{group}={option}"


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
    built = "train"
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


# --- issue 26: a CLI a new user gets right the first time ---

SPP_DET_SCRIPT = Path(sys.executable).parent / "spp-det"  # the console script pip installed


def entry(*args: str, cwd: Path | None = None):
    """``spp-det ARGS`` through ``main(argv)`` in this process; the two tests below run real processes."""
    result = cli(*args, cwd=cwd)
    assert "Traceback" not in result.stderr + result.stdout  # no traceback for any user mistake
    return result


def test_version_through_the_installed_console_script():
    from spp_det import __version__

    result = subprocess.run([str(SPP_DET_SCRIPT), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"spp-det {__version__}"


def test_a_mistake_through_python_m_spp_det_is_one_line_and_exit_2(tmp_path):
    """A real process (``python -m spp_det``, as torchrun starts it): exit status, stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "spp_det", "train", "data.rot=x"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and not result.stdout and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "did you mean data.root" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "data.rot=x"], "unknown key data.rot (did you mean data.root"),
    (["eval", "experiment=dmeo"], "experiment=dmeo: no such option (did you mean demo?)"),
    (["detect", "detect.sorce=x"], "did you mean detect.source"),
    (["train", "data.classes=raccoon"], "data.classes is a list: write 'data.classes=[raccoon]'"),
    (["train", "data.classes=[a,b"], "cannot read 'data.classes=[a,b'"),
    (["train", "model.checkpoint=m.pt"], "model.checkpoint has moved"),
    (["train", "model.timm_kwargs={output_stride:16}"], "a new key inside it is added with +model.timm_kwargs.NAME=VALUE"),
])
def test_command_line_mistakes_get_one_line_on_stderr_and_exit_2(args, message, tmp_path):
    result = entry(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and not result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_stage_help_lists_what_the_stage_reads_with_comments():
    eval_help, detect_help = entry("eval", "--help"), entry("detect", "--help")
    assert eval_help.returncode == 0 and detect_help.returncode == 0 and eval_help.stdout != detect_help.stdout
    lines = eval_help.stdout.splitlines()
    assert lines[0].startswith("usage: spp-det eval") and len(lines) <= 50  # a screenful, no 315-line dump
    assert "Hydra" not in lines[0] and "== Config ==" not in eval_help.stdout  # no Hydra banner
    common = lines.index("Common overrides (current value, then what it means):")
    assert lines[common + 2].startswith("  eval.checkpoint=runs/default/model.pt")  # the common ones first
    assert "keep SVM scores above this" in eval_help.stdout  # the YAML comment of eval.score_thresh
    assert "--cfg job" in lines[-2] and "detect.source=???" in detect_help.stdout
    assert "demo" in entry("eval", "experiment=demo", "--help").stdout.split("name=")[1].split()[0]


def test_hydra_help_ends_without_a_traceback():
    result = entry("train", "--hydra-help")
    assert result.returncode == 0 and "--cfg job" in result.stdout


def test_the_groups_a_stage_reads_cover_the_keys_of_its_artifacts():
    for stage in STAGES:
        reads = {read.split(".")[0] for key in stage.keys for read in key.reads} - {"seed"}
        assert reads <= set(stage.groups), stage.name


def leaky_dataset(root: Path, test_ids: list[str]) -> Path:
    from conftest import write_voc

    images = {f"im{i}": {"objects": [("disc", (5, 5, 40, 30), False)]} for i in range(4)}
    write_voc(root, images, split="trainval")  # every image, the test ones included
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in test_ids))
    return root


def test_overlapping_or_empty_splits_stop_before_any_work(tmp_path):
    data = leaky_dataset(tmp_path / "voc", ["im2", "im3"])
    common = [f"data.root={data}", "data.year=null", "data.classes=[disc]", "name=leak"]
    result = entry("train", *common, cwd=tmp_path)
    assert result.returncode == 1 and not (tmp_path / "runs").exists()  # no stamped run folder left
    assert "data.train_split=trainval and data.test_split=test share 2 images (e.g. im2, im3)" in result.stderr
    assert "data.allow_split_overlap=true" in result.stderr
    (data / "ImageSets" / "Main" / "test.txt").write_text("\n")
    result = entry("eval", *common, cwd=tmp_path)
    assert result.returncode == 1 and f"{data / 'ImageSets' / 'Main' / 'test.txt'}: split 'test'" in result.stderr
    assert "lists no images" in result.stderr and not (tmp_path / "runs").exists()


def test_the_split_check_passes_disjoint_splits_and_the_opt_out():
    from spp_det.data.voc import check_splits

    with TemporaryDirectory() as tmp:
        data = leaky_dataset(Path(tmp), ["im2"])
        cfg = compose_config([f"data.root={data}", "data.year=null"])
        with pytest.raises(UserError, match="share 1 images"):
            check_splits(DataSettings.of(cfg.data))
        check_splits(DataSettings.of(compose_config([f"data.root={data}", "data.year=null",
                                                     "data.allow_split_overlap=true"]).data))
        (data / "ImageSets" / "Main" / "trainval.txt").write_text("im0\nim1\n")
        check_splits(DataSettings.of(cfg.data))
        check_splits(DataSettings.of(cfg.data), training=False)


def test_the_synthetic_dataset_passes_the_split_check(tmp_path):
    from spp_det.data.synth import write_synthetic
    from spp_det.data.voc import check_splits

    cfg = compose_config(["experiment=demo", f"data.root={tmp_path}", "synth.num_images=10", "synth.pretrain_images=3",
                          "synth.min_side=64", "synth.max_side=96", "synth.objects_per_image=[1,2]"])
    write_synthetic(tmp_path, cfg.synth, list(cfg.data.classes), progress=False)
    check_splits(DataSettings.of(cfg.data))  # data=synth: train / val / test
    check_splits(DataSettings.of(compose_config([f"data.root={tmp_path}", "data.year=null"]).data))  # voc07's trainval, test


def test_detect_defaults_to_the_runs_model_and_says_where_it_looked(tmp_path):
    (tmp_path / "photos").mkdir()
    result = entry("detect", "name=nothing", f"detect.source={tmp_path / 'photos'}", cwd=tmp_path)
    assert result.returncode == 1 and "runs/nothing/model.pt: no model file there" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_eval_loads_the_runs_model_and_takes_its_classes(tiny_model):
    common = ["eval", "name=tiny", f"data.root={tiny_model / 'voc'}", "data.year=null", "device=cpu",
              "proposals=opencv_fast", "proposals.resize_to=96", "num_workers=1", f"cache_dir={tiny_model / 'cache'}"]
    result = entry(*common, cwd=tiny_model)  # no eval.checkpoint, no data.classes: the run's model.pt gives both
    assert result.returncode == 0, result.stderr
    assert "loaded runs/tiny/model.pt (classes disc, block)" in result.stdout + result.stderr
    (metrics,) = (tiny_model / "runs" / "tiny" / "logs").glob("eval_*/metrics.json")
    assert list(json.loads(metrics.read_text())["ap_voc07"]) == ["disc", "block"]
    shutil.rmtree(tiny_model / "runs" / "tiny" / "logs")
    result = entry(*common, "data.classes=[block,disc]", cwd=tiny_model)  # given, and not the model's
    assert result.returncode == 1 and "the model detects classes ['disc', 'block']" in result.stderr
    assert not (tiny_model / "runs" / "tiny" / "logs").exists()  # the failed run left no folder
    detect = ["detect", *common[1:], "data.classes=[disc,block]", f"detect.source={tiny_model / 'voc' / 'JPEGImages'}",
              f"detect.output={tiny_model / 'out'}"]
    result = entry(*detect, cwd=tiny_model)  # the run's model too; a data key is not silently ignored
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "loaded runs/tiny/model.pt" in output and "does not read data.classes, data.root, data.year" in output
    (tiny_model / "foreign.pt").write_bytes(b"PK\x03\x04 not a model")
    result = entry(*common, f"eval.checkpoint={tiny_model / 'foreign.pt'}", cwd=tiny_model)
    assert result.returncode == 1 and "not a spp-det model.pt" in result.stderr and "weights_only" not in result.stderr
