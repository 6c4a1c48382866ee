"""End to end (slow): synth -> train -> eval -> detect on a tiny synthetic set, through the CLI.

Run with `make test-slow`. A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPP_DET = [sys.executable, "-m", "spp_det.cli"]


def spp_det(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([*SPP_DET, *args], cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"spp-det {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_whole_pipeline_on_a_tiny_synthetic_set(tmp_path):
    common = ["experiment=demo", f"data.root={tmp_path / 'synth'}", f"cache_dir={tmp_path / 'cache'}",
              f"work_dir={tmp_path / 'work'}", "device=cpu"]
    spp_det("synth", *common, "synth.num_images=60", cwd=tmp_path)
    train = spp_det("train", *common, "pretrain.epochs=12", "finetune.iterations=400", "finetune.val_every=100",
                    "finetune.checkpoint_every=200", cwd=tmp_path)
    assert "finetune" in train.stdout and (tmp_path / "work" / "model.pt").is_file()
    spp_det("eval", *common, f"model.checkpoint={tmp_path / 'work' / 'model.pt'}",
            f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # chance is near 0 (random boxes among ~400 proposals per image); a working detector is far above it
    assert metrics["map_voc07"] > 0.3, metrics["ap_voc07"]
    assert metrics["num_images"] == 24 and (tmp_path / "eval" / "pr_curves.png").is_file()

    images = tmp_path / "synth" / "JPEGImages"
    spp_det("detect", *common, f"model.checkpoint={tmp_path / 'work' / 'model.pt'}", f"detect.source={images}",
            f"detect.output={tmp_path / 'detect'}", f"hydra.run.dir={tmp_path / 'detect_log'}", cwd=tmp_path)
    lines = (tmp_path / "detect" / "detections.jsonl").read_text().splitlines()
    assert lines and {"file", "class", "score", "box"} <= set(json.loads(lines[0]))
    assert len(list((tmp_path / "detect" / "annotated").iterdir())) == 60

    # a second train run finds every trained stage current and skips it
    again = spp_det("train", *common, "pretrain.epochs=12", "finetune.iterations=400", "finetune.val_every=100",
                    "finetune.checkpoint_every=200", cwd=tmp_path)
    assert again.stdout.count("skipped (current)") == 4
