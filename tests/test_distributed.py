"""Several processes: the helpers of ``spp_det.distributed``, a smoke test of ``spp-det eval`` under
``torchrun --nproc_per_node=2`` (gloo, CPU) against one process (the fast suite), and the pipeline
under torchrun against one process on a tiny synthetic set (marked slow: `make test-slow`).

The smoke test evaluates the tiny model.pt (tests/conftest.py) once in this process and once under
torchrun: the 2 ranks split the test images and gather them, so metrics and result files are equal.

The pipeline test (slow) runs ``train`` (proposals, features, finetune, svm, bboxreg, model.pt) and
``eval`` with ``python -m spp_det``, then ``train`` under torchrun, then ``train`` and ``eval``
under torchrun from the one-process ``finetune.pt``, each run with its own cache and work
directory, and checks:

- proposals and conv5 cache entries: the same files with the same contents (deterministic);
- fine-tuning under DDP (each rank half of every mini-batch): without dropout (whose masks each
  rank draws itself) the weights equal one process's up to the order of the float sums;
- svm, bboxreg and eval from the *same* finetune.pt: identical SVMs, regressors and metrics (the
  classes split over the ranks, the test images split and gathered: deterministic);
- detect on a folder: the same detection files and annotated image names.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_det import distributed

# ------------------------------------------------------------------------- the helpers, one process


def test_one_process_helpers_are_the_identity():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main() and distributed.shard([3, 1, 2]) == [3, 1, 2]
    assert distributed.gather("x") == ["x"] and distributed.all_gather({"a": 1}) == [{"a": 1}]
    net = torch.nn.Linear(2, 2)
    assert distributed.ddp(net, torch.device("cpu")) is net
    assert distributed.batch_share(8) == slice(0, 8, 1) and distributed.loss_scale(8) == 1 / 8


def test_shards_are_disjoint_and_cover_everything(monkeypatch):
    items = list(range(11))
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        parts.append(distributed.shard(items))
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]


def test_the_batch_split_gives_the_whole_batch_gradient():
    """Each rank's summed loss times ``loss_scale``, gradients averaged over the ranks (what DDP
    does) = the gradient of the whole batch's mean loss, for shares of unequal size too."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    whole = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), net.weight)[0]
    world, grads = 2, []
    for r in range(world):
        rows = slice(r, 7, world)
        loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows], reduction="sum") * world / 7
        grads.append(torch.autograd.grad(loss, net.weight)[0])
    torch.testing.assert_close(sum(grads) / world, whole)


# ---------------------------------------------------------- eval under torchrun (the fast suite)

def test_eval_in_two_processes_equals_one_process(tiny_model):
    """``eval.processes=2`` starts two processes under torchrun (``cli.launch``): same metrics and result files."""
    from conftest import spp_det_cli

    root = tiny_model
    common = ["eval", f"eval.checkpoint={root / 'runs' / 'tiny' / 'model.pt'}", f"data.root={root / 'voc'}",
              "data.year=null", "device=cpu", "proposals=opencv_fast", "proposals.resize_to=96", "num_workers=1",
              f"cache_dir={root / 'cache'}", "eval.coco=false"]  # the 2 ranks read the proposals the 1st run cached
    one = spp_det_cli(*common, f"hydra.run.dir={root / 'one'}", cwd=root)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "spp_det", *common, "eval.processes=2", f"hydra.run.dir={root / 'two'}"],
                         cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, f"{two.stdout[-3000:]}\n{two.stderr[-5000:]}"
    one_m, two_m = (json.loads((root / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert (one_m["processes"], two_m["processes"]) == (1, 2)
    assert one_m["num_images"] == two_m["num_images"] == 2 and sum(one_m["num_det"].values()) > 0
    for key in ("map_voc07", "map_voc10", "ap_voc07", "ap_voc10", "num_det", "num_detections", "without_bbox_reg"):
        assert one_m[key] == two_m[key], key
    results = sorted(p.name for p in (root / "one").glob("comp4_det_test_*.txt"))
    assert results == sorted(f"comp4_det_test_{c}.txt" for c in one_m["ap_voc07"])  # one file per class
    for name in results:
        assert (root / "one" / name).read_text() == (root / "two" / name).read_text(), name


# ------------------------------------------------------- the pipeline under torchrun (slow)

CLASSES = ["circle", "square", "cross"]
SYNTH = {"pretrain_images": 0, "seed": 3, "num_images": 16, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "min_side": 96,
         "max_side": 128, "objects_per_image": [1, 2], "min_object": 24, "max_object_frac": 0.6,
         "difficult_below": 24, "small_fraction": 0.0, "truncated_fraction": 0.0, "distractors": [0, 1]}
# a tiny random ZF-5 (no pretraining: allow_random_backbone), tiny scales, few iterations
TINY = ["~experiment", "allow_random_backbone=true", "pretrain.enabled=false", "data=synth",
        f"data.classes=[{','.join(CLASSES)}]", "model=zf5_narrow", "model.width=0.125", "model.fc_dim=64",
        "model.scales=[96,128]", "model.max_size=200", "model.dropout=0", "proposals=opencv_fast", "proposals.max_boxes=300",
        "device=cpu", "num_workers=1", "finetune.iterations=40", "finetune.val_every=20",
        "finetune.checkpoint_every=20", "finetune.batch_size=32", "finetune.lr=0.01", "finetune.lr_steps=[30]",
        "svm.retrain_limit=50", "svm.scale_images=4", "svm.scale_windows=20", "svm.C=0.1",
        "bboxreg.scale_images=4", "bboxreg.scale_windows=20", "bboxreg.lam=10", "eval.coco=false"]
# max |difference| of a fine-tuned weight, 2 processes against 1, 40 iterations without dropout (measured:
# 1.5e-8, the order of the float sums; with dropout 0.5, i.e. other masks, 0.015 for weights up to 0.13)
FINETUNE_TOLERANCE = 1e-6


def launch(prefix: list[str], stage: str, root: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    cache = root / ("two" if run == "same" else run) / "cache"  # "same" reuses the caches the 2-process run filled
    args = [*prefix, stage, *TINY, f"data.root={root / 'synth'}", f"cache_dir={cache}", f"work_dir={root / run / 'work'}",
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the same for one process
    result = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def one(stage, root, run, *extra):
    return launch([sys.executable, "-m", "spp_det"], stage, root, run, *extra)


def two(stage, root, run, *extra):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "spp_det"]
    return launch(torchrun, stage, root, run, *extra)


def evaluate(runner, root, run) -> dict:
    runner("eval", root, run, f"eval.checkpoint={root / run / 'work' / 'model.pt'}",
           f"hydra.run.dir={root / run / 'eval'}")
    return json.loads((root / run / "eval" / "metrics.json").read_text())


def cache_files(root: Path, run: str, kind: str) -> dict[str, Path]:
    base = root / run / "cache" / kind
    return {str(p.relative_to(base)): p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from spp_det.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("dist")
    write_synthetic(root / "synth", SYNTH, CLASSES, progress=False)
    one("train", root, "one")
    two("train", root, "two")
    metrics = {"one": evaluate(one, root, "one")}
    # svm, bboxreg and eval under torchrun again, from the one-process finetune.pt
    (root / "same" / "work").mkdir(parents=True)
    shutil.copy(root / "one" / "work" / "finetune.pt", root / "same" / "work" / "finetune.pt")
    two("train", root, "same")
    metrics["same"] = evaluate(two, root, "same")
    for runner, run in ((one, "one"), (two, "same")):  # detect on a folder with the one-process model.pt
        runner("detect", root, run, f"detect.checkpoint={root / 'one' / 'work' / 'model.pt'}",
               f"detect.source={root / 'synth' / 'JPEGImages'}", f"detect.output={root / run / 'detect'}",
               "detect.format=[jsonl,coco,voc]", "detect.score_thresh=-1.5", f"hydra.run.dir={root / run / 'detect_log'}")
    return root, metrics


@pytest.mark.slow  # the pipeline: 3 trains, 2 evals, 2 detects (~1 min); the smoke test above is fast
def test_proposals_and_conv5_caches_are_identical(runs):
    root, _ = runs
    for kind in ("proposals", "conv5"):
        a, b = cache_files(root, "one", kind), cache_files(root, "two", kind)
        assert a and sorted(a) == sorted(b), kind
        for name in a:
            if name.endswith(".npy"):
                assert np.array_equal(np.load(a[name]), np.load(b[name])), name
            elif name.endswith(".pt"):
                ea, eb = (torch.load(p, weights_only=True) for p in (a[name], b[name]))
                assert ea["image_hw"] == eb["image_hw"]
                assert all(torch.equal(x, y) for x, y in zip(ea["conv5"], eb["conv5"], strict=True)), name


@pytest.mark.slow  # the pipeline: 3 trains, 2 evals, 2 detects (~1 min); the smoke test above is fast
def test_ddp_finetuning_is_within_the_tolerance_of_one_process(runs):
    root, _ = runs
    a, b = (torch.load(root / r / "work" / "finetune.pt", weights_only=True) for r in ("one", "two"))
    diffs = {k: float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]
             if k.startswith("head.")}
    assert max(diffs.values()) < FINETUNE_TOLERANCE, diffs
    assert float((a["fc8"]["weight"] - b["fc8"]["weight"]).abs().max()) < FINETUNE_TOLERANCE
    assert a["val"]["best_iteration"] == b["val"]["best_iteration"]
    assert abs(a["val"]["best_loss"] - b["val"]["best_loss"]) < 1e-6


@pytest.mark.slow  # the pipeline: 3 trains, 2 evals, 2 detects (~1 min); the smoke test above is fast
def test_svm_bboxreg_and_eval_from_the_same_finetune_are_identical(runs):
    root, metrics = runs
    for artifact in ("svm.pt", "bboxreg.pt"):
        a, b = (torch.load(root / r / "work" / artifact, weights_only=True) for r in ("one", "same"))
        assert torch.equal(a["weight"], b["weight"]), artifact
        assert a["feature_scale"] == b["feature_scale"]
    one_m, two_m = metrics["one"], metrics["same"]
    assert two_m["processes"] == 2 and one_m["processes"] == 1
    for key in ("map_voc07", "map_voc10", "ap_voc07", "ap_voc10", "num_detections", "without_bbox_reg"):
        assert one_m[key] == two_m[key], key
    for name in (f"comp4_det_test_{c}.txt" for c in CLASSES):
        assert (root / "one" / "eval" / name).read_text() == (root / "same" / "eval" / name).read_text()


@pytest.mark.slow  # the pipeline: 3 trains, 2 evals, 2 detects (~1 min); the smoke test above is fast
def test_detect_on_a_folder_writes_the_same_files(runs):
    root, _ = runs
    one_dir, two_dir = root / "one" / "detect", root / "same" / "detect"
    for name in ("detections.jsonl", "detections_coco.json", "coco_images.json"):
        assert (one_dir / name).read_text() == (two_dir / name).read_text(), name
    assert (one_dir / "detections.jsonl").read_text()  # something was detected
    for sub in ("annotated", "voc"):
        names = sorted(p.name for p in (one_dir / sub).iterdir())
        assert len(names) == 16 and names == sorted(p.name for p in (two_dir / sub).iterdir()), sub
