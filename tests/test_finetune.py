"""Fine-tuning: R-CNN/SPP-net window sampling, the fc training loop (resume, snapshot on
validation), and the stage end to end on a tiny synthetic set."""
from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from spp_det.boxes import box_iou
from spp_det.data.voc import ImageRecord
from spp_det.errors import UserError
from spp_det.model import new_fc8
from spp_det.stages import finetune
from spp_det.training import sampling
from spp_det.training.loop import lr_at
from spp_det.training.windows import finetune_windows

from conftest import SYNTH_CLASSES

HAS_ENGINE = all(importlib.util.find_spec(m) is not None for m in ("spp_det.model", "spp_det.features.cache",
                                                                      "spp_det.proposals"))




pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# ---------------------------------------------------------------------------- sampling


def random_boxes(rng, n, size=200):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(8, size * 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_foreground_and_background_follow_the_iou_ranges():
    rng = np.random.default_rng(0)
    gt = random_boxes(rng, 3)
    windows = np.concatenate([random_boxes(rng, 500), gt + rng.normal(0, 4, gt.shape).astype(np.float32)])
    labelled = sampling.label_windows(windows, gt, np.array([1, 2, 3]), fg_iou=0.5)
    fg, bg = sampling.fg_bg_indices(labelled, 0.5, (0.1, 0.5))
    iou = box_iou(windows, gt).max(1)
    assert len(fg) and len(bg)
    assert (iou[fg] >= 0.5).all() and (labelled.labels[fg] > 0).all()
    assert ((iou[bg] >= 0.1) & (iou[bg] < 0.5)).all() and (labelled.labels[bg] == 0).all()
    # a foreground window's label is the class of the box it overlaps most
    best = box_iou(windows[fg], gt).argmax(1)
    assert (labelled.labels[fg] == np.array([1, 2, 3])[best]).all()
    # windows overlapping nothing (IoU < 0.1) are in neither set
    assert not set(np.flatnonzero(iou < 0.1)) & (set(fg) | set(bg))


def test_a_batch_is_one_quarter_foreground_when_there_is_enough():
    idx, n_fg = sampling.sample_minibatch(np.arange(100), np.arange(100, 1000), 128, 0.25, np.random.default_rng(0))
    assert len(idx) == 128 and n_fg == 32 and len(set(idx.tolist())) == 128
    assert (idx[:32] < 100).all() and (idx[32:] >= 100).all()


def test_few_foreground_windows_are_filled_up_with_background_and_vice_versa():
    idx, n_fg = sampling.sample_minibatch(np.arange(5), np.arange(5, 1000), 128, 0.25, np.random.default_rng(0))
    assert n_fg == 5 and len(idx) == 128
    idx, n_fg = sampling.sample_minibatch(np.arange(200), np.arange(200, 210), 128, 0.25, np.random.default_rng(0))
    assert len(idx) == 128 and n_fg == 118 and (idx >= 200).sum() == 10
    idx, n_fg = sampling.sample_minibatch(np.arange(0), np.arange(3), 128, 0.25, np.random.default_rng(0))
    assert n_fg == 0 and sorted(idx.tolist()) == [0, 1, 2]


def test_sampling_is_seeded():
    a = sampling.sample_minibatch(np.arange(50), np.arange(50, 500), 64, 0.25, np.random.default_rng(3))[0]
    b = sampling.sample_minibatch(np.arange(50), np.arange(50, 500), 64, 0.25, np.random.default_rng(3))[0]
    c = sampling.sample_minibatch(np.arange(50), np.arange(50, 500), 64, 0.25, np.random.default_rng(4))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def make_record(boxes, labels, difficult=None, width=200, height=200):
    n = len(boxes)
    return ImageRecord("img", Path("img.jpg"), width, height, np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(labels, np.int64), np.zeros(n, bool) if difficult is None else np.asarray(difficult),
                       np.zeros(n, bool))


FCFG = OmegaConf.create({"fg_iou": 0.5, "bg_iou": [0.1, 0.5], "max_bg_per_image": 4})


def test_ground_truth_boxes_are_foreground_candidates_and_background_is_capped():
    rec = make_record([[10, 10, 60, 60], [100, 100, 180, 150]], [2, 5])
    rng = np.random.default_rng(0)
    proposals = np.concatenate([random_boxes(rng, 300), [[12, 12, 62, 62]]]).astype(np.float32)
    windows, labels, n_fg = finetune_windows(rec, proposals, FCFG, False, rng)
    assert np.array_equal(windows[:2], rec.boxes) and labels[:2].tolist() == [2, 5]  # GT first, own class
    assert n_fg >= 3 and (labels[:n_fg] > 0).all()
    assert len(windows) - n_fg == 4 and (labels[n_fg:] == 0).all()  # max_bg_per_image


def test_an_image_without_objects_gives_no_windows_and_no_error():
    rec = make_record(np.zeros((0, 4)), [])
    windows, labels, n_fg = finetune_windows(rec, random_boxes(np.random.default_rng(0), 50), FCFG, False,
                                                   np.random.default_rng(0))
    assert n_fg == 0 and len(windows) == 0  # every proposal has IoU 0 < 0.1: neither fg nor bg


def test_windows_on_a_difficult_object_are_neither_foreground_nor_background():
    rec = make_record([[10, 10, 60, 60], [100, 100, 180, 150]], [2, 5], difficult=[False, True])
    on_difficult = np.array([[101, 101, 179, 151]], np.float32)
    windows, labels, n_fg = finetune_windows(rec, on_difficult, FCFG, False, np.random.default_rng(0))
    assert n_fg == 1 and len(windows) == 1  # only the non-difficult GT box itself
    windows, labels, n_fg = finetune_windows(rec, on_difficult, FCFG, True, np.random.default_rng(0))
    assert n_fg == 3  # with use_difficult both boxes and the window are foreground


# ---------------------------------------------------------------------------- the fc loop


DIM, CLASSES = 24, 4


def toy_pool(seed: int, n_per_class: int = 60) -> finetune.WindowPool:
    """Pool5-like vectors whose class is a mean shift along its own direction."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), [3 * n_per_class] + [n_per_class] * (CLASSES - 1))  # 25% fg
    x = rng.normal(0, 1, (len(labels), DIM)) + 3 * np.eye(CLASSES, DIM)[labels]
    return finetune.WindowPool(x.astype(np.float16), labels.astype(np.int64),
                               np.flatnonzero(labels > 0), np.flatnonzero(labels == 0), 1)


def toy_net(seed: int = 0) -> finetune.FCClassifier:
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5))
    return finetune.FCClassifier(head, new_fc8(64, CLASSES, 0.01))


def loop_cfg(**kw):
    base = {"batch_size": 32, "fg_fraction": 0.25, "lr": 0.1, "lr_steps": [40], "lr_gamma": 0.1,
            "iterations": 60, "momentum": 0.9, "weight_decay": 0.0005, "val_every": 15, "checkpoint_every": 20}
    return OmegaConf.create({**base, **kw})


def test_fc8_starts_as_gaussian_with_std_0_01():
    fc8 = new_fc8(512, 21, 0.01)
    assert abs(float(fc8.weight.detach().std()) - 0.01) < 0.001 and float(fc8.bias.detach().abs().max()) == 0


def test_learning_rate_steps():
    assert lr_at(0, 1e-4, [250000], 0.1) == 1e-4
    assert lr_at(249999, 1e-4, [250000], 0.1) == 1e-4
    assert lr_at(250000, 1e-4, [250000], 0.1) == pytest.approx(1e-5)


def test_training_lowers_the_validation_loss():
    net, pool, val = toy_net(), toy_pool(0), toy_pool(1)
    before = finetune.evaluate(net, val, np.arange(len(val.labels)), "cpu")
    result = finetune.train_fc(net, pool, val, loop_cfg(), seed=0, device=torch.device("cpu"))
    assert result["best_loss"] < before["loss"] - 0.5
    assert result["best_accuracy"] > 0.7


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    pool, val = toy_pool(0), toy_pool(1)
    cpu = torch.device("cpu")
    full = toy_net()
    full_result = finetune.train_fc(full, pool, val, loop_cfg(), 0, cpu, tmp_path / "a.pt", "s")

    class Killed(Exception):
        pass

    def kill_at_45(it, net):
        if it == 45:
            raise Killed

    state = tmp_path / "b.pt"
    with pytest.raises(Killed):
        finetune.train_fc(toy_net(), pool, val, loop_cfg(), 0, cpu, state, "s", on_iteration=kill_at_45)
    assert finetune.io.load_torch(state)["step"] == 40  # the last checkpoint before the kill
    seen = []
    resumed = toy_net(seed=123)  # different start: everything must come from the checkpoint
    resumed_result = finetune.train_fc(resumed, pool, val, loop_cfg(), 0, cpu, state, "s",
                                       on_iteration=lambda it, net: seen.append(it))
    assert seen[0] == 41
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed_result == full_result


def test_a_checkpoint_with_other_settings_is_not_resumed(tmp_path):
    pool, val = toy_pool(0), toy_pool(1)
    state = tmp_path / "s.pt"
    with pytest.raises(RuntimeError):
        finetune.train_fc(toy_net(), pool, val, loop_cfg(), 0, torch.device("cpu"), state, "old",
                          on_iteration=lambda it, net: (_ for _ in ()).throw(RuntimeError()) if it == 25 else None)
    seen = []
    finetune.train_fc(toy_net(), pool, val, loop_cfg(), 0, torch.device("cpu"), state, "new",
                      on_iteration=lambda it, net: seen.append(it))
    assert seen[0] == 1


def test_the_snapshot_with_the_lowest_validation_loss_is_kept():
    losses = iter([3.0, 1.0, 2.0, 2.5])  # validations at 15, 30, 45, 60: the best is at 30
    snapshots = {}

    def fake_evaluate(net, pool, indices, device):
        return {"loss": next(losses), "accuracy": 0.5}

    def remember(it, net):
        snapshots[it] = {k: v.clone() for k, v in net.state_dict().items()}

    net = toy_net()
    result = finetune.train_fc(net, toy_pool(0), toy_pool(1), loop_cfg(), 0, torch.device("cpu"),
                               on_iteration=remember, evaluate_fn=fake_evaluate)
    assert result["best_iteration"] == 30 and result["best_loss"] == 1.0
    assert [h["iteration"] for h in result["history"]] == [15, 30, 45, 60]
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshots[30][k]), k
    assert not torch.equal(net.fc8.weight, snapshots[60]["fc8.weight"])


def test_no_foreground_is_a_clear_error():
    pool = toy_pool(0)
    only_bg = finetune.WindowPool(pool.pool5, np.zeros_like(pool.labels), np.zeros(0, np.int64),
                                  np.arange(len(pool.labels)), 1)
    with pytest.raises(UserError, match="no foreground"):
        finetune.train_fc(toy_net(), only_bg, pool, loop_cfg(), 0, torch.device("cpu"))


# ---------------------------------------------------------------------------- the stage (real engine)

def fake_proposals(records, proposals_cfg, cache_dir, workers=0, progress=True):
    """Stand-in for selective search (slow, and not what is tested here): jittered ground-truth
    boxes and random boxes, deterministic per image, of the unflipped image."""
    out = {}
    for r in records:
        rng = np.random.default_rng(zlib.crc32(r.image_id.encode()))  # not hash(): salted per process
        jitter = np.concatenate([r.boxes + rng.normal(0, 4, r.boxes.shape) for _ in range(6)]) if len(r.boxes) else \
            np.zeros((0, 4))
        boxes = np.concatenate([jitter, random_boxes(rng, 30, min(r.width, r.height))]).astype(np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, r.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, r.height)
        out[r.image_id] = boxes[(boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)]
    return out


@pytest.fixture
def stage(monkeypatch, synth_root, tmp_path):
    """A tiny ZF-5 finetune config on the synthetic set (tests/conftest.py), with stand-in proposals
    (the name the stage module bound is replaced; ``stage.proposal_calls`` counts the calls)."""
    calls = []

    def stand_in(records, *args, **kwargs):
        calls.append(len(records))
        return fake_proposals(records, *args, **kwargs)

    monkeypatch.setattr(finetune, "load_proposals", stand_in)
    from spp_det.config import compose_config

    def make(work="work", *extra):
        cfg = compose_config([
            "~experiment", "allow_random_backbone=true", "data=synth", "model=zf5_narrow", "model.width=0.125", "model.fc_dim=64", "model.scales=[96]",
            "device=cpu", f"work_dir={tmp_path / work}", f"cache_dir={tmp_path / 'cache'}",
            f"data.classes=[{','.join(SYNTH_CLASSES)}]", "finetune.iterations=30", "finetune.val_every=10",
            "finetune.checkpoint_every=10", "finetune.batch_size=32", "finetune.lr=0.01", "finetune.lr_steps=[20]",
            *extra], stage="finetune")
        cfg.data.root = str(synth_root)
        return cfg

    make.proposal_calls = calls  # the tests that train check the stand-in was used (not selective search)
    return make


def test_finetune_writes_a_weights_only_artifact_with_a_k_plus_1_way_fc8(stage, tmp_path):
    cfg = stage()
    assert finetune.run(cfg) == 0
    from spp_det.data.voc import train_val_split
    from spp_det.settings import DataSettings

    train, val = train_val_split(DataSettings.of(cfg.data))
    assert stage.proposal_calls == [len(train) + len(val)]  # the stand-in gave every image's boxes: no search ran
    ckpt = torch.load(tmp_path / "work" / "finetune.pt", weights_only=True)
    assert ckpt["fc8"]["weight"].shape == (len(SYNTH_CLASSES) + 1, 64)
    assert ckpt["meta"]["classes"] == SYNTH_CLASSES
    assert any(k.startswith("head.fc6") for k in ckpt["state_dict"])
    assert ckpt["val"]["best_iteration"] in (10, 20, 30)
    assert [h["iteration"] for h in ckpt["val"]["history"]] == [10, 20, 30]
    assert not (tmp_path / "work" / finetune.STATE).exists()
    from spp_det.model import build_model

    build_model(cfg.model).load_state_dict(ckpt["state_dict"])  # a complete SPPNet state


def test_a_killed_finetune_stage_resumes_to_the_same_artifact(stage, tmp_path):
    assert finetune.run(stage("full")) == 0

    def kill(it, net):
        if it == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.run(stage("resumed"), on_iteration=kill)
    assert (tmp_path / "resumed" / finetune.STATE).exists() and not (tmp_path / "resumed" / "finetune.pt").exists()
    assert finetune.run(stage("resumed")) == 0
    a = torch.load(tmp_path / "full" / "finetune.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "finetune.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert torch.equal(a["fc8"]["weight"], b["fc8"]["weight"]) and a["val"] == b["val"]


def test_a_pretrain_checkpoint_from_another_config_is_refused(stage, tmp_path):
    cfg = stage("work", "pretrain.enabled=true")  # this config pretrains: finetune starts from work_dir/pretrain.pt
    other = {**finetune.io.checkpoint_meta(cfg), "classes": ["cat", "dog"]}
    finetune.io.save_torch({"backbone": {}, "meta": other}, tmp_path / "work" / "pretrain.pt")
    with pytest.raises(UserError, match="another configuration"):
        finetune.run(cfg)


class FakeModel:
    """pool5 = a function of the window's coordinates, so rows can be checked."""

    pool5_dim = 4

    def pool5(self, maps, image_hw, windows):
        return windows.float() / 100


class FakeCache:
    def __init__(self):
        self.calls = 0

    def conv5(self, record):
        self.calls += 1
        return [torch.zeros(1, 1, 2, 2)]


@pytest.mark.parametrize("in_memory_mb", [2048, 0])
def test_the_window_pool_holds_each_windows_pool5_in_memory_or_on_disk(tmp_path, in_memory_mb):
    rec = make_record([[10, 10, 60, 60]], [2])
    proposals = {"img": np.array([[12, 11, 61, 59], [30, 30, 80, 80], [150, 150, 190, 190]], np.float32)}
    cfg = OmegaConf.merge(FCFG, {"pool_in_memory_mb": in_memory_mb})
    records = [rec, rec.flip()]
    cache = FakeCache()
    pool = finetune.build_pool(FakeModel(), cache, records, proposals, cfg, False, 0, torch.device("cpu"),
                               tmp_path, "key", "test")
    # per image: the GT box and the near proposal are foreground; the IoU-0.1..0.5 one is background
    assert pool.labels.tolist() == [2, 2, 0, 2, 2, 0] and pool.fg.tolist() == [0, 1, 3, 4]
    flipped_gt = rec.flip().boxes[0]
    assert np.allclose(pool.pool5[3].astype(np.float32), flipped_gt / 100, atol=1e-3)  # mirrored windows
    assert (tmp_path / "key.npy").exists() == (in_memory_mb == 0)
    if in_memory_mb == 0:  # a second build reads the on-disk cache instead of pooling again
        again = finetune.build_pool(FakeModel(), cache, records, proposals, cfg, False, 0, torch.device("cpu"),
                                    tmp_path, "key", "test")
        rows = np.arange(len(pool.labels))
        assert cache.calls == 2 and np.array_equal(again.pool5[rows], pool.pool5[rows])
        # a plain .npy file: numpy reads the same rows, in the order the windows were labelled
        assert np.array_equal(np.load(tmp_path / "key.npy"), pool.pool5[rows])
        assert np.array_equal(pool.pool5[[4, 1, 4]], np.load(tmp_path / "key.npy")[[4, 1, 4]])
