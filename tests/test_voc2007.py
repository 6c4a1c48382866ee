"""Pascal VOC 2007 (slow): the VOC preset trains on a slice of the genuine VOC 2007 subset (its first
150 official trainval images) and is scored on the first 150 official test images, through the CLI
as a user runs it. Run with `make test-slow`; skipped visibly without the data
(`../shared/data/voc2007_subset`, or SPP_DET_VOC2007 pointing to its VOCdevkit folder).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

VOC2007 = Path(os.environ.get("SPP_DET_VOC2007", REPO.parent / "shared" / "data" / "voc2007_subset" / "VOCdevkit"))


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    if not (VOC2007 / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        pytest.skip(f"VOC 2007 subset not found at {VOC2007} (set SPP_DET_VOC2007)")
    root = tmp_path_factory.mktemp("voc2007")
    common = ["experiment=voc07_cpu", f"data.root={VOC2007}", "data.max_images=150", f"work_dir={root / 'work'}",
              f"cache_dir={root / 'cache'}", "device=cpu", "finetune.iterations=1500", "finetune.lr_steps=[1000]"]
    for stage in ("train", "eval"):
        result = subprocess.run([sys.executable, "-m", "spp_det.cli", stage, *common, f"hydra.run.dir={root / stage}"],
                                cwd=root, capture_output=True, text=True, timeout=3600)
        assert result.returncode == 0, f"spp-det {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads((root / "eval" / "metrics.json").read_text())


def test_the_voc_preset_learns_voc_classes_from_150_images(metrics):
    # Chance (every proposal scored alike) gives each class about the share of its proposals that hit an
    # object, far below 5% mAP; 150 images leave several classes with a handful of objects, so the bar is low.
    assert metrics["num_images"] == 150
    assert metrics["map_voc07"] > 0.15, metrics["ap_voc07"]
    assert sum(ap > 0.3 for ap in metrics["ap_voc07"].values() if ap is not None) >= 5, metrics["ap_voc07"]
