"""Shared fixtures: the real VOC sample (skipped visibly when absent) and a tiny VOC-layout writer."""
from __future__ import annotations

import os
import shutil
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


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """A real model.pt for classes [disc, block] at runs/tiny/model.pt under ``tmp_path``, and a
    VOC-layout test split of those classes."""
    from test_svm import tiny_setup

    from spp_det.stages.assemble import assemble
    from spp_det.stages import bboxreg as bboxreg_stage
    from spp_det.stages import svm as svm_stage

    cfg = tiny_setup(tmp_path, monkeypatch)
    monkeypatch.setattr(bboxreg_stage, "training_records", svm_stage.training_records)
    assert svm_stage.run(cfg) == 0 and bboxreg_stage.run(cfg) == 0
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    shutil.move(assemble(cfg), tmp_path / "runs" / "tiny" / "model.pt")
    objects = [("disc", (10, 10, 50, 40), False), ("block", (60, 15, 100, 45), False)]
    write_voc(tmp_path / "voc", {f"t{i}": {"size": (128, 96), "objects": objects} for i in range(2)}, split="test")
    return tmp_path
