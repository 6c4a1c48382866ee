"""Shared fixtures: the real VOC sample (skipped visibly when absent), a tiny VOC-layout writer, the
CLI driven in this process (``spp_det_cli``), and what several files train or write once per session
(``tiny_trained``: the tiny svm + bboxreg artifacts; ``tiny_model``: its model.pt; ``synth_root``: a
small synthetic set)."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VOC_SAMPLE = Path(os.environ.get("SPP_DET_VOC_SAMPLE", REPO.parent / "shared" / "data" / "voc2012_sample"))


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny tensors: avoids OpenMP spin-waits on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def voc_sample() -> Path:
    """The 100-image VOC 2012 sample, read in place (never copied into the repository)."""
    if not (VOC_SAMPLE / "VOC2012" / "ImageSets" / "Main" / "all.txt").is_file():
        pytest.skip(f"VOC sample not found at {VOC_SAMPLE} (set SPP_DET_VOC_SAMPLE)")
    return VOC_SAMPLE


def write_voc(root: Path, images: dict[str, dict], split: str = "train") -> Path:
    """Write a minimal VOC-layout dataset.

    ``images``: image_id -> {"size": (w, h), "objects": [(name, (xmin, ymin, xmax, ymax), difficult)],
    "xml": optional raw XML text (overrides objects), "no_image": bool}.
    """
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, spec in images.items():
        w, h = spec.get("size", (64, 48))
        if not spec.get("no_image"):
            Image.fromarray(np.full((h, w, 3), 127, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if "xml" in spec:
            xml = spec["xml"]
        else:
            objs = "".join(
                f"<object><name>{n}</name><truncated>0</truncated><difficult>{int(d)}</difficult>"
                f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                for n, b, d in spec.get("objects", [])
            )
            xml = (f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width>"
                   f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return root


# ------------------------------------------------------------------- the CLI, in this process

@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def spp_det_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """``spp-det ARGS`` run in this process through ``spp_det.cli.main(argv)`` (no interpreter and no
    torch import per command): its exit status and what it printed, the logs Hydra sends to the
    console included. What a run changes in the process (Hydra's global config, the logging handlers,
    sys.argv, the environment, the working directory, torch's threads) is put back afterwards, so a
    later test sees a fresh process. An exception the CLI lets through fails the test (a subprocess
    would have printed a traceback). ``tests/test_cli.py`` keeps real subprocesses of the entry point."""
    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from spp_det.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_logging = (root.level, root.handlers[:], {name: (lg.level, lg.handlers[:], lg.propagate, lg.disabled)
                     for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)})
    saved = (sys.argv[:], dict(os.environ), os.getcwd(), torch.get_num_threads())
    code = 0
    try:
        root.handlers[:] = []  # as in a new process: records before Hydra's logging set-up reach stderr (lastResort)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
    finally:
        HydraConfig.instance().cfg = None  # stages ask Hydra for the run directory and the command line
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in saved_logging[1]:
                handler.close()
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        for name, (level, handlers, propagate, disabled) in saved_logging[2].items():
            lg = logging.getLogger(name)
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.level, lg.handlers[:], lg.propagate, lg.disabled = level, handlers, propagate, disabled
        sys.argv[:] = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        os.chdir(saved[2])
        torch.set_num_threads(saved[3])
    return CliResult(code, out.getvalue(), err.getvalue())


# ------------------------------------------------- trained or written once per session

@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """``(root, cfg)``: the tiny set of ``test_svm.tiny_setup`` with its svm.pt and bboxreg.pt trained
    once per session under ``root/work``. Read only: tests that write copy it (``trained``, ``tiny_model``)."""
    from test_svm import tiny_setup

    from spp_det.stages import bboxreg as bboxreg_stage
    from spp_det.stages import svm as svm_stage

    root = tmp_path_factory.mktemp("tiny_trained")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cfg = tiny_setup(root, monkeypatch)
        monkeypatch.setattr(bboxreg_stage, "training_records", svm_stage.training_records)
        assert svm_stage.run(cfg) == 0 and bboxreg_stage.run(cfg) == 0
    return root, cfg


@pytest.fixture
def trained(tiny_trained, tmp_path):
    """The config of ``tiny_trained`` with its work_dir copied under ``tmp_path`` (the test may write there)."""
    root, cfg = tiny_trained
    shutil.copytree(root / "work", tmp_path / "work")
    cfg = copy.deepcopy(cfg)
    cfg.work_dir, cfg.cache_dir = str(tmp_path / "work"), str(tmp_path / "cache")
    return cfg


@pytest.fixture(scope="session")
def tiny_model_root(tiny_trained, tmp_path_factory) -> Path:
    from spp_det.stages.assemble import assemble
    from spp_det.settings import RunSettings

    root = tmp_path_factory.mktemp("tiny_model")
    cfg = copy.deepcopy(tiny_trained[1])
    shutil.copytree(Path(cfg.work_dir), root / "work")
    cfg.work_dir, cfg.cache_dir = str(root / "work"), str(root / "cache")
    (root / "runs" / "tiny").mkdir(parents=True)
    shutil.move(assemble(RunSettings.of(cfg)), root / "runs" / "tiny" / "model.pt")
    shutil.rmtree(root / "work")
    objects = [("disc", (10, 10, 50, 40), False), ("block", (60, 15, 100, 45), False)]
    write_voc(root / "voc", {f"t{i}": {"size": (128, 96), "objects": objects} for i in range(2)}, split="test")
    return root


@pytest.fixture
def tiny_model(tiny_model_root, tmp_path):
    """A real model.pt for classes [disc, block] at runs/tiny/model.pt under ``tmp_path``, and a
    VOC-layout test split of those classes (``voc/``): built once per session, copied for each test."""
    shutil.copytree(tiny_model_root, tmp_path, dirs_exist_ok=True)
    return tmp_path


# the small synthetic set of the finetune and pretrain tests (3 classes, 24 images of 96-128 pixels)
SYNTH_CLASSES = ["circle", "square", "triangle"]
SYNTH = {"pretrain_images": 0, "seed": 0, "num_images": 24, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
         "min_side": 96, "max_side": 128, "objects_per_image": [1, 2], "min_object": 20, "max_object_frac": 0.6,
         "difficult_below": 20, "small_fraction": 0.0, "distractors": [0, 1]}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """``SYNTH`` written once per session (read only: no test writes into a dataset)."""
    from spp_det.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, SYNTH, SYNTH_CLASSES, progress=False)
    return root
