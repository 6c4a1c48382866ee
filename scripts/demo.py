#!/usr/bin/env python
"""`make demo`: SPP-net end to end on the synthetic dataset, on the CPU, with nothing downloaded.

synth (data/synth: 300 detection images + 1,000 pretraining images) -> train (experiment=demo:
narrow ZF-5 pretrained on synthetic crops then windows, selective-search proposals, fine-tuning,
SVMs, box regression) -> eval on the held-out test
split -> detect on a folder of test images. Ends with the mAP, the per-class table and where
the outputs are. Each step is an ordinary `spp-det` command, printed before it runs, so a user
can rerun any of them by hand.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPP_DET = str(Path(sys.executable).parent / "spp-det")
SYNTH = "data/synth"
RUN = Path("runs/demo")
DETECT_IMAGES = Path("data/demo_images")
N_DETECT = 12


def step(*args: str) -> None:
    cmd = [SPP_DET, *args]
    print(f"\n$ spp-det {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    start = time.perf_counter()
    splits = REPO / SYNTH / "ImageSets" / "Main"
    if (splits / "test.txt").is_file() and (splits / "pretrain.txt").is_file():
        print(f"\n{SYNTH} exists: using it (delete it to regenerate)")
    elif (REPO / SYNTH / "synth_summary.json").is_file():  # an older demo dataset without the pretraining split
        step("synth", "experiment=demo", f"data.root={SYNTH}", "synth.overwrite=true")
    else:
        step("synth", "experiment=demo", f"data.root={SYNTH}")
    step("train", "experiment=demo")
    model = RUN / "model.pt"
    step("eval", "experiment=demo", f"model.checkpoint={model}", f"hydra.run.dir={RUN}/eval")

    # a small folder of held-out test images for `detect` (copies, so inputs stay untouched)
    test_ids = (REPO / SYNTH / "ImageSets/Main/test.txt").read_text().split()[:N_DETECT]
    (REPO / DETECT_IMAGES).mkdir(parents=True, exist_ok=True)
    for image_id in test_ids:
        shutil.copy2(REPO / SYNTH / "JPEGImages" / f"{image_id}.jpg", REPO / DETECT_IMAGES / f"{image_id}.jpg")
    step("detect", "experiment=demo", f"model.checkpoint={model}", f"detect.source={DETECT_IMAGES}",
         f"detect.output={RUN}/detect", f"hydra.run.dir={RUN}/detect")

    metrics = json.loads((REPO / RUN / "eval" / "metrics.json").read_text())
    minutes = (time.perf_counter() - start) / 60
    print("\n" + "=" * 72)
    print(f"demo done in {minutes:.1f} min: VOC07 mAP {metrics['map_voc07']:.3f}, VOC10 mAP {metrics['map_voc10']:.3f}")
    if "without_bbox_reg" in metrics:
        print(f"  SVM scores alone (no box regression): VOC07 mAP {metrics['without_bbox_reg']['map_voc07']:.3f}")
    print(f"  model:            {RUN / 'model.pt'}")
    print(f"  metrics, PR plot: {RUN / 'eval'}/metrics.json, pr_curves.png, comp4_det_test_*.txt")
    print(f"  annotated images: {RUN / 'detect'}/ (detections.jsonl)")
    print(f"  training summary: {RUN / 'train_summary.json'}")
    print(f"  the whole evaluation at a glance (open in a browser): {RUN / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
