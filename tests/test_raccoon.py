"""Real photos (slow): the default recipe trains on the raccoon set (160 photos) and detects raccoons
in its 40 test photos; `detect` draws them on a folder of photos. Through the CLI, as a user runs it.

Run with `make test-slow` (about 10 minutes on 2 CPU cores); skipped visibly without the data.
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

RACCOON = Path(os.environ.get("SPP_DET_RACCOON", REPO.parent / "shared" / "data" / "raccoon"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not (RACCOON / "ImageSets" / "Main" / "test.txt").is_file():
        pytest.skip(f"raccoon photos not found at {RACCOON} (set SPP_DET_RACCOON)")
    root = tmp_path_factory.mktemp("raccoon")
    common = [f"data.root={RACCOON}", "data.classes=[raccoon]", "data.train_split=train", "data.test_split=test",
              f"work_dir={root / 'work'}", f"cache_dir={root / 'cache'}", "device=cpu"]

    def spp_det(*args):
        result = subprocess.run([sys.executable, "-m", "spp_det.cli", *args, *common], cwd=root, capture_output=True,
                                text=True, timeout=2400)
        assert result.returncode == 0, f"spp-det {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    spp_det("train")  # no preset: the default recipe, EfficientNet-Lite0 with packaged ImageNet weights
    model = root / "work" / "model.pt"
    spp_det("eval", f"eval.checkpoint={model}", f"hydra.run.dir={root / 'eval'}")
    photos = root / "photos"
    photos.mkdir()
    for image_id in (RACCOON / "ImageSets" / "Main" / "test.txt").read_text().split()[:5]:
        (photos / f"{image_id}.jpg").write_bytes((RACCOON / "JPEGImages" / f"{image_id}.jpg").read_bytes())
    spp_det("detect", f"detect.checkpoint={model}", f"detect.source={photos}", f"detect.output={root / 'detect'}",
            f"hydra.run.dir={root / 'detect_log'}")
    return root, json.loads((root / "eval" / "metrics.json").read_text())


def test_the_default_recipe_detects_raccoons_in_real_photos(trained):
    root, metrics = trained
    # Chance (a box per photo at random, or every proposal scored alike) is far below 0.2; the measured
    # 3-seed mean is in the README ("Train on your own photos").
    assert metrics["ap_voc07"]["raccoon"] > 0.6, metrics["ap_voc07"]
    assert metrics["num_images"] == 40


def test_detect_draws_raccoons_on_a_folder_of_photos(trained):
    root, _ = trained
    found = [json.loads(line) for line in (root / "detect" / "detections.jsonl").read_text().splitlines()]
    confident = {d["file"] for d in found if d["class"] == "raccoon" and d["score"] > 0}
    assert len(confident) >= 4  # at least 4 of the 5 photos get a positive-scored raccoon box
    assert len(list((root / "detect" / "annotated").iterdir())) == 5
