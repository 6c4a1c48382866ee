"""Repeatability (issue 36): `spp-det train` twice with the same seed, each run with its own work
directory and its own caches, writes the same model.pt byte for byte (the fine-tuned network, the
SVMs, the box regressors and everything recorded beside them)."""
from __future__ import annotations

import torch

from conftest import SYNTH_CLASSES, spp_det_cli

# a tiny random ZF-5 (no pretraining), tiny scales, few iterations: every stage of `train` runs
TINY = ["~experiment", "allow_random_backbone=true", "pretrain.enabled=false", "data=synth",
        f"data.classes=[{','.join(SYNTH_CLASSES)}]", "model=zf5_narrow", "model.width=0.125", "model.fc_dim=64",
        "model.scales=[96]", "model.max_size=200", "proposals=opencv_fast", "proposals.max_boxes=200",
        "data.max_images=6", "device=cpu", "num_workers=1", "finetune.iterations=10", "finetune.val_every=5",
        "finetune.checkpoint_every=5", "finetune.batch_size=32", "finetune.lr=0.01", "finetune.lr_steps=[8]",
        "svm.retrain_limit=50", "svm.scale_images=4", "svm.scale_windows=20", "svm.C=0.1",
        "bboxreg.scale_images=4", "bboxreg.scale_windows=20", "bboxreg.lam=10", "seed=5"]


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a loaded model.pt by its dotted key."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_training_twice_with_the_same_seed_writes_the_same_model_bytes(synth_root, tmp_path):
    models = []
    for run in ("a", "b"):
        result = spp_det_cli("train", *TINY, f"data.root={synth_root}", f"work_dir={tmp_path / run}",
                             f"cache_dir={tmp_path / run / 'cache'}", f"hydra.run.dir={tmp_path / run / 'log'}",
                             cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        models.append(tmp_path / run / "model.pt")
    a, b = (torch.load(path, weights_only=True) for path in models)
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and any(k.startswith("svm.") for k in ta) and any(k.startswith("state_dict.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors that differ between two runs with the same seed: {different}"
    assert models[0].read_bytes() == models[1].read_bytes()  # the rest too: classes, config, scales, meta
