"""Pretraining: object crops, the multi-size SPP classifier loop, resume, and the stage's artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from spp_det import io
from spp_det.boxes import box_iou
from spp_det.data.synth import write_synthetic
from spp_det.data.voc import load_split
from spp_det.errors import UserError
from spp_det.proposals import record_proposals
from spp_det.config import compose_config
from spp_det.settings import DataSettings, RunSettings
from spp_det.stages import pretrain, pretrain_crops, pretrain_windows
from spp_det.training import crops as crop_data
from spp_det.training import loop, sampling

from conftest import SYNTH
from conftest import SYNTH_CLASSES as CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def data_cfg(root):
    return DataSettings.of(OmegaConf.merge(compose_config(["data=synth"]).data, {
        "root": str(root), "year": 2007, "train_split": "train", "val_split": "val", "classes": CLASSES,
        "unknown_classes": "error", "max_images": None}))


# the pretrain group's values (every key: spp_det.settings.PretrainSettings) with these changed
PCFG = OmegaConf.merge(compose_config([]).pretrain, {
    "crop_context": 0.1, "background_crops": True, "background_per_image": 2, "sizes": [32, 24], "scale_jitter": 0.8,
    "epochs": 6, "batch_size": 16, "lr": 0.01, "lr_steps": [5], "lr_gamma": 0.1, "momentum": 0.9, "weight_decay": 0.0005})


def test_crops_cover_every_object_and_background_crops_avoid_objects(synth_root):
    records = load_split(data_cfg(synth_root), "train")
    crops = crop_data.crop_boxes(records, 0.1, 2, np.random.default_rng(0))
    n_objects = sum(int((~r.difficult).sum()) for r in records)
    objects = [c for c in crops if c[2] > 0]
    background = [c for c in crops if c[2] == 0]
    assert len(objects) == n_objects and len(background) > 0
    for i, box, label, obj in objects:  # the padded crop contains its object
        rec = records[i]
        inside = [(box[:2] <= b[:2] + 1e-4).all() and (box[2:] >= b[2:] - 1e-4).all() for b in rec.boxes]
        assert any(inside)
        assert any(np.allclose(obj, b) for b in rec.boxes)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= rec.width and box[3] <= rec.height
    for i, box, _, inner in background:  # IoU < 0.3 with every object of its image
        assert box_iou(box[None], records[i].boxes).max(initial=0) < 0.3
        assert (inner[:2] > box[:2]).all() and (inner[2:] < box[2:]).all()  # its "object": the middle part


class TinyBackbone(nn.Module):
    """Stand-in for ZF-5: stride 8, 8 channels; records the input sizes it sees."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.seen_sizes: list[int] = []

    def forward(self, x):
        if self.training:
            self.seen_sizes.append(x.shape[-1])
        return self.net(x)


def tiny_classifier(num_classes: int) -> pretrain_crops.SPPClassifier:
    torch.manual_seed(0)
    levels = (3, 2, 1)
    head = nn.Sequential(nn.Linear(8 * 14, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5))
    return pretrain_crops.SPPClassifier(TinyBackbone(), lambda x: pretrain_crops.whole_map_pyramid(x, levels), head,
                                        num_classes=num_classes, fc_dim=32)


def normalise(x):
    return x.float() / 255 - 0.5


def crop_sets(root):
    from spp_det.data.voc import train_val_split

    train, val = train_val_split(data_cfg(root))
    rng = np.random.default_rng(0)
    return (crop_data.voc_crop_set(train, CLASSES, PCFG, 36, rng), crop_data.voc_crop_set(val, CLASSES, PCFG, 36, rng))


def test_whole_map_pyramid_of_one_cell_repeats_it():
    conv5 = torch.arange(6.0).view(1, 6, 1, 1)
    out = pretrain_crops.whole_map_pyramid(conv5, (2, 1))
    assert out.shape == (1, 6 * 5)
    assert torch.equal(out[0, :24].view(6, 4), conv5.view(6, 1).expand(6, 4))


def test_multi_size_training_alternates_input_sizes_and_lowers_the_loss(synth_root):
    train_set, val_set = crop_sets(synth_root)
    model = tiny_classifier(len(train_set.class_names))
    history = pretrain_crops.train_classifier(model, normalise, train_set, val_set, PCFG, torch.device("cpu"), seed=0)
    assert [h["size"] for h in history] == [32, 24, 32, 24, 32, 24]
    batches = -(-len(train_set) // PCFG.batch_size)
    assert model.backbone.seen_sizes == [s for s in [32, 24, 32, 24, 32, 24] for _ in range(batches)]
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    assert history[-1]["lr"] == pytest.approx(0.001) and history[0]["lr"] == 0.01


def test_an_interrupted_pretraining_resumes_to_the_same_weights(synth_root, tmp_path):
    train_set, val_set = crop_sets(synth_root)
    cfg = OmegaConf.merge(PCFG, {"epochs": 3})
    full = tiny_classifier(len(train_set.class_names))
    pretrain_crops.train_classifier(full, normalise, train_set, val_set, cfg, torch.device("cpu"), 0, tmp_path / "a.pt", "s")

    def stop_after_first(epoch, entry):
        if epoch == 0:
            raise KeyboardInterrupt

    state = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        pretrain_crops.train_classifier(tiny_classifier(len(train_set.class_names)), normalise, train_set, val_set, cfg,
                                  torch.device("cpu"), 0, state, "s", on_epoch=stop_after_first)
    resumed = tiny_classifier(len(train_set.class_names))
    nn.init.zeros_(resumed.classifier.weight)  # must come back from the checkpoint
    history = pretrain_crops.train_classifier(resumed, normalise, train_set, val_set, cfg, torch.device("cpu"), 0, state, "s")
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------- the stage (real engine)


def stage_cfg(root, tmp_path, **over):
    overrides = [f"data.root={root}", "data=synth", "model=zf5_narrow", "model.width=0.125", "model.fc_dim=64",
                 "model.scales=[96]", "device=cpu", f"work_dir={tmp_path / 'work'}", f"cache_dir={tmp_path / 'cache'}",
                 "pretrain.enabled=true", "pretrain.sizes=[48,32]", "pretrain.epochs=2", "pretrain.batch_size=16",
                 f"data.classes=[{','.join(CLASSES)}]"]
    cfg = compose_config(overrides + [f"{k}={v}" for k, v in over.items()], stage="pretrain")
    cfg.data.root = str(root)  # the data=synth group sets its own root
    return cfg


def test_pretrain_writes_a_weights_only_artifact_with_backbone_and_head(synth_root, tmp_path):
    pytest.importorskip("spp_det.model", reason="the SPP engine (spp_det.model) is not built yet")
    cfg = stage_cfg(synth_root, tmp_path)
    assert pretrain.run(cfg) == 0
    ckpt = torch.load(tmp_path / "work" / "pretrain.pt", weights_only=True)
    assert set(ckpt) >= {"backbone", "head", "meta"}
    assert ckpt["meta"]["sizes"] == [48, 32] and ckpt["meta"]["classes"] == CLASSES
    assert [h["size"] for h in ckpt["history"]] == [48, 32]
    assert not (tmp_path / "work" / pretrain.STATE).exists()  # the resumable checkpoint is cleaned up
    io.check_checkpoint(ckpt["meta"], cfg, "pretrain.pt")  # matches its own config
    from spp_det.model import build_model

    model = build_model(cfg.model)
    model.backbone.load_state_dict(ckpt["backbone"])
    model.head.load_state_dict(ckpt["head"])


def test_pretrain_is_skipped_with_imagenet_weights_or_when_disabled(synth_root, tmp_path):
    assert pretrain.run(stage_cfg(synth_root, tmp_path, **{"pretrain.enabled": "false"})) == 0
    assert pretrain.run(stage_cfg(synth_root, tmp_path, **{"model.weights": "IMAGENET1K_V1"})) == 0
    assert not (tmp_path / "work" / "pretrain.pt").exists()


def test_bad_settings_are_clear_errors(synth_root, tmp_path):
    with pytest.raises(UserError, match="pretrain.source"):
        pretrain.run(stage_cfg(synth_root, tmp_path, **{"pretrain.source": "imagenet"}))
    with pytest.raises(UserError, match="image_folder"):
        pretrain.run(stage_cfg(synth_root, tmp_path, **{"pretrain.source": "image_folder",
                                                         "pretrain.image_folder": str(tmp_path / "nope")}))


def test_channel_shuffle_permutes_colours_of_training_crops_only():
    # a crop with three distinct constant channels: a shuffled batch holds the same values in other orders
    crop = torch.stack([torch.full((8, 8), v, dtype=torch.uint8) for v in (10, 120, 240)])
    crops = crop_data.CropSet(lambda j: crop, np.zeros(64, np.int64), ["bg"])
    g = torch.Generator().manual_seed(0)
    images, _ = crop_data.make_batch(crops, np.arange(64), 8, True, 1.0, g, channel_shuffle=True)
    orders = {tuple(int(images[k, c, 4, 4]) for c in range(3)) for k in range(64)}
    assert all(sorted(o) == [10, 120, 240] for o in orders) and len(orders) > 3
    plain, _ = crop_data.make_batch(crops, np.arange(8), 8, True, 1.0, g)
    assert all(tuple(int(plain[k, c, 4, 4]) for c in range(3)) == (10, 120, 240) for k in range(8))
    evaluated, _ = crop_data.make_batch(crops, np.arange(8), 8, False, 1.0, g, channel_shuffle=True)
    assert torch.equal(evaluated, crop.expand(8, 3, 8, 8))  # evaluation: colours untouched


def test_optimizer_choice_sgd_or_adam_and_adam_learns(synth_root):
    model = tiny_classifier(4)
    assert isinstance(loop.make_optimizer(model, PCFG.optimizer, PCFG), torch.optim.SGD)
    adam = OmegaConf.merge(PCFG, {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.0})
    assert isinstance(loop.make_optimizer(model, adam.optimizer, adam), torch.optim.AdamW)
    with pytest.raises(UserError, match="pretrain.optimizer"):
        loop.make_optimizer(model, "lbfgs", PCFG)
    train_set, val_set = crop_sets(synth_root)
    history = pretrain_crops.train_classifier(tiny_classifier(len(train_set.class_names)), normalise, train_set, val_set,
                                        OmegaConf.merge(adam, {"channel_shuffle": True}), torch.device("cpu"), seed=0)
    assert history[-1]["loss"] < history[0]["loss"] - 0.1


def test_object_windows_follow_the_crop_resize_and_flip_and_object_pooling_uses_them(synth_root):
    train_set, _ = crop_sets(synth_root)
    j = int(np.flatnonzero(train_set.labels > 0)[0])
    frac = train_set.windows[j]
    assert ((frac >= 0) & (frac <= 1)).all() and (frac[2:] > frac[:2]).all()
    _, _, wins = crop_data.make_batch(train_set, np.array([j]), 30, False, 1.0, torch.Generator(), return_windows=True)
    assert torch.allclose(wins[0], torch.tensor(frac * 30), atol=1e-4)  # evaluation: the whole crop resized
    # a mirrored full-area training crop mirrors the window: x -> size - x
    crop = torch.zeros(3, 10, 10, dtype=torch.uint8)
    crop[:, :, :3] = 255  # a bright left band marks which side is which
    one = crop_data.CropSet(lambda i: crop, np.array([1]), ["bg", "a"], np.array([[0.0, 0.2, 0.3, 0.8]], np.float32))
    for seed in range(20):
        image, _, win = crop_data.make_batch(one, np.array([0]), 10, True, 1.0, torch.Generator().manual_seed(seed),
                                            return_windows=True)
        left_bright = image[0, 0, 5, 0] > 128
        assert (win[0, 0] < 5) == bool(left_bright)  # the window stays on the bright band
    model = tiny_classifier(len(train_set.class_names))
    model.window_pool = lambda conv5, w: torch.zeros(len(w), 8 * 14)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert not torch.allclose(model(x), model(x, torch.zeros(2, 4)))  # windows switch to the window pool


# ---------------------------------------------------------------------------- source=windows


def test_window_sampling_labels_by_iou_and_keeps_one_scale(synth_root):
    records = load_split(data_cfg(synth_root), "train")
    rec = next(r for r in records if len(r.boxes))
    rng = np.random.default_rng(0)
    scale_of = lambda b: (np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) > 40).astype(int)  # two "scales"
    for _ in range(5):
        s, boxes, labels = sampling.sample_scale_windows(rec, scale_of, 32, 0.25, 0.5, rng, use_difficult=True)
        assert len(boxes) > 0 and (scale_of(boxes) == s).all()  # all pooled on one map
        iou = box_iou(boxes, rec.boxes)
        fg = labels > 0
        assert (iou[fg].max(1) >= 0.5).all() and (iou[~fg].max(1) < 0.5).all()
        assert (labels[fg] == rec.labels[iou[fg].argmax(1)]).all()
        assert 0 < fg.sum() <= 8  # at most fg_fraction of the batch
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= rec.width).all() and (boxes[:, 3] <= rec.height).all()


def test_window_sampling_draws_background_from_proposals_mirrored_with_the_image(synth_root):
    records = load_split(data_cfg(synth_root), "train")
    rec = next(r for r in records if len(r.boxes)).flip()
    # a proposal far from every object (IoU 0), in unflipped image coordinates
    far = np.array([[0, 0, 6, 6], [rec.width - 6, rec.height - 6, rec.width, rec.height]], np.float32)
    far = far[box_iou(far, rec.boxes).max(1) == 0][:1]
    assert len(far) == 1
    unflipped = {rec.image_id: np.array([[rec.width - far[0, 2], far[0, 1], rec.width - far[0, 0], far[0, 3]]],
                                        np.float32)}
    assert np.allclose(record_proposals(rec, unflipped), far)  # mirrored as the record is
    one_scale = lambda b: np.zeros(len(b), int)
    rng = np.random.default_rng(0)
    _, boxes, labels = sampling.sample_scale_windows(rec, one_scale, 2000, 0.25, 0.5, rng, True, far)
    assert (boxes == far).all(1).any() and labels[(boxes == far).all(1)].max() == 0  # drawn, as background
    rng = np.random.default_rng(0)
    _, plain, _ = sampling.sample_scale_windows(rec, one_scale, 2000, 0.25, 0.5, rng, True)
    near_far = lambda b: (box_iou(b, far)[:, 0] > 0.5).sum()  # the proposal and its jittered copies
    assert near_far(boxes) > near_far(plain) + 100


def test_window_settings_cover_what_windows_depend_on(synth_root, tmp_path):
    base = {"pretrain.source": "crops+windows"}
    key = lambda **o: pretrain.settings_key(RunSettings.of(stage_cfg(synth_root, tmp_path, **{**base, **o})))
    crop_key = lambda **o: pretrain.settings_key(RunSettings.of(stage_cfg(synth_root, tmp_path, **{**base, **o})),
                                                pretrain.CROPS)
    props = {"pretrain.window_proposals": "{mode: single, resize_to: 200}"}
    assert key(**props) != key() and crop_key(**props) == crop_key()
    assert key(**props) != key(**props, **{"proposals.max_boxes": 100})  # the boxes it reads
    assert key(**{"model.scales": "[64]"}) != key() and crop_key(**{"model.scales": "[64]"}) == crop_key()
    assert key(**{"pretrain.frozen_convs": 2}) != key() and crop_key(**{"pretrain.frozen_convs": 2}) == crop_key()
    test_only = {"eval.scales": "[64,96]", "eval.max_size": 300}  # eval / detect settings
    assert key(**test_only) == key() and crop_key(**test_only) == crop_key()


def test_test_only_model_settings_never_make_trained_stages_stale(tmp_path):
    from spp_det.stages import finetune, heads, svm

    base = RunSettings.of(compose_config(["experiment=demo"]))
    tested = RunSettings.of(compose_config(["experiment=demo", "eval.scales=[160,896]", "eval.max_size=1300",
                                            "eval.checkpoint=x.pt"]))
    assert finetune.settings_key(tested, None) == finetune.settings_key(base, None)
    (tmp_path / "finetune.pt").write_bytes(b"weights")
    finetuned = tmp_path / "finetune.pt"
    assert heads.settings_key(tested, svm.KEY, finetuned) == heads.settings_key(base, svm.KEY, finetuned)
    trained = RunSettings.of(compose_config(["experiment=demo", "model.scales=[160,896]"]))
    assert finetune.settings_key(trained, None) != finetune.settings_key(base, None)


def test_windows_source_trains_on_whole_images_and_writes_a_loadable_artifact(synth_root, tmp_path):
    pytest.importorskip("spp_det.model", reason="the SPP engine (spp_det.model) is not built yet")
    cfg = stage_cfg(synth_root, tmp_path, **{"pretrain.source": "windows", "pretrain.iterations": 60,
                                             "pretrain.log_every": 20, "pretrain.windows_per_image": 32,
                                             "pretrain.optimizer": "adam", "pretrain.lr": 0.003,
                                             "pretrain.weight_decay": 0.0, "pretrain.iteration_lr_steps": "[50]",
                                             "model.scales": "[64,96]", "model.best_scale_area": 1600})
    assert pretrain.run(cfg) == 0
    ckpt = torch.load(tmp_path / "work" / "pretrain.pt", weights_only=True)
    assert set(ckpt) >= {"backbone", "head", "classifier", "meta"}
    assert ckpt["meta"]["source"] == "windows" and ckpt["meta"]["classes"] == CLASSES
    assert ckpt["classifier"]["weight"].shape[0] == len(CLASSES) + 1  # background + K
    history = ckpt["history"]
    assert [h["iteration"] for h in history] == [20, 40, 60]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["lr"] == pytest.approx(0.0003)
    assert 0.0 <= history[-1]["val_acc"] <= 1.0
    assert not (tmp_path / "work" / pretrain.STATE).exists()
    io.check_checkpoint(ckpt["meta"], cfg, "pretrain.pt")
    from spp_det.model import build_model

    model = build_model(cfg.model)
    model.backbone.load_state_dict(ckpt["backbone"])
    model.head.load_state_dict(ckpt["head"])
    assert pretrain.run(cfg) == 0  # current: skipped, artifact unchanged
    assert torch.load(tmp_path / "work" / "pretrain.pt", weights_only=True)["history"] == history


def test_crops_then_windows_on_a_pretraining_split(tmp_path, caplog):
    """source=crops+windows: crop training writes pretrain_crops.pt, window training starts from
    it; pretrain.train_split picks the images (here synth's extra `pretrain` split only)."""
    pytest.importorskip("spp_det.model", reason="the SPP engine (spp_det.model) is not built yet")
    root = tmp_path / "synth"
    write_synthetic(root, {**SYNTH, "num_images": 8, "pretrain_images": 5}, CLASSES, progress=False)
    windows = {"pretrain.source": "crops+windows", "pretrain.train_split": "pretrain", "pretrain.iterations": 4,
               "pretrain.log_every": 2, "pretrain.windows_per_image": 8, "pretrain.epochs": 1,
               "model.scales": "[64,96]", "model.best_scale_area": 1600,
               "pretrain.window_proposals": "{mode: single, resize_to: 96}"}
    cfg = stage_cfg(root, tmp_path, **windows)
    with caplog.at_level("INFO", logger="spp_det.stages"):
        assert pretrain.run(cfg) == 0
    work = tmp_path / "work"
    crops = torch.load(work / pretrain.CROPS_ARTIFACT, weights_only=True)
    final = torch.load(work / pretrain.ARTIFACT, weights_only=True)
    assert crops["meta"]["source"] == "voc_crops" and final["meta"]["source"] == "windows"
    assert f"window training starts from {work / pretrain.CROPS_ARTIFACT}" in caplog.text
    assert "windows of 5 training images" in caplog.text  # the pretrain split, not data.train_split
    assert "proposals of the pretraining images" in caplog.text
    assert len(list((tmp_path / "cache" / "proposals").glob("*/*"))) >= 5  # cached like detection's
    # a windows-only change keeps the crop phase
    caplog.clear()
    with caplog.at_level("INFO", logger="spp_det.stages"):
        assert pretrain.run(stage_cfg(root, tmp_path, **{**windows, "pretrain.iterations": 6})) == 0
    assert "pretrain_crops.pt is current" in caplog.text
    assert torch.load(work / pretrain.CROPS_ARTIFACT, weights_only=True)["history"] == crops["history"]
    assert torch.load(work / pretrain.ARTIFACT, weights_only=True)["history"][-1]["iteration"] == 6
    # frozen_convs=1: window training leaves conv1 and its norm as the crop phase wrote them
    assert pretrain.run(stage_cfg(root, tmp_path, **{**windows, "pretrain.frozen_convs": 1})) == 0
    fixed = torch.load(work / pretrain.ARTIFACT, weights_only=True)["backbone"]
    conv1, conv2 = "body.0.weight", "body.4.weight"
    assert torch.equal(fixed[conv1], crops["backbone"][conv1])
    assert not torch.equal(fixed[conv2], crops["backbone"][conv2])
    assert not torch.equal(final["backbone"][conv1], crops["backbone"][conv1])  # trained without it


def test_frozen_convs_fix_leading_convs_and_their_norms():
    from spp_det.model import build_model

    backbone = build_model(compose_config(["model=zf5_narrow", "model.width=0.05", "model.norm=batchnorm"]).model).backbone
    assert pretrain_windows.freeze_leading_convs(backbone, 0) == []
    fixed = pretrain_windows.freeze_leading_convs(backbone, 2)
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen == ["body.0.weight", "body.1.weight", "body.1.bias", "body.4.weight", "body.5.weight", "body.5.bias"]
    assert {id(p) for m in fixed for p in m.parameters()} == {id(p) for p in backbone.parameters() if not p.requires_grad}
    with pytest.raises(UserError, match="has 5 conv layers"):
        pretrain_windows.freeze_leading_convs(backbone, 6)


def test_frozen_layers_stay_bit_identical_through_window_training(synth_root):
    """Frozen means frozen: parameters AND BatchNorm buffers (running statistics) of the first two
    convs are unchanged by window training and the held-out evaluation inside it; later layers move."""
    from spp_det.model import build_model

    cfg = compose_config(["model=zf5_narrow", "model.width=0.05", "model.fc_dim=16", "model.norm=batchnorm",
                          "model.scales=[96]", "pretrain.iterations=6", "pretrain.log_every=3",
                          "pretrain.windows_per_image=16", "pretrain.optimizer=adam", "pretrain.lr=0.01"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    classifier = nn.Linear(model.head.out_dim, len(CLASSES) + 1)
    fixed = pretrain_windows.freeze_leading_convs(model.backbone, 2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    records = load_split(data_cfg(synth_root), "train")
    pretrain_windows.train_windows(pretrain_windows.WindowTrainer(model, classifier, fixed), records[:6], records[6:8], cfg.pretrain, 0)
    after = model.backbone.state_dict()
    frozen_keys = [k for k in before if k.split(".")[1] in {"0", "1", "4", "5"}]  # conv1, bn1, conv2, bn2
    assert any("running_mean" in k for k in frozen_keys) and any("num_batches_tracked" in k for k in frozen_keys)
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert not torch.equal(before["body.8.weight"], after["body.8.weight"])  # conv3 trains
    assert not torch.equal(before["body.9.running_mean"], after["body.9.running_mean"])  # and its norm adapts
    assert all(not m.training for m in fixed) and model.backbone.body[8].training


def test_window_sampling_takes_the_scale_of_a_ground_truth_box_after_degenerate_ones_are_dropped(tmp_path):
    """A ground-truth box narrower than 2 px is dropped from the candidates; the scale is still the
    best scale of a ground-truth box picked by identity, not of whatever box took its position."""
    from spp_det.data.voc import ImageRecord

    boxes = np.array([[10, 10, 11, 40], [20, 20, 90, 90]], np.float32)  # degenerate (scale 0), then valid (scale 1)
    rec = ImageRecord("img", tmp_path / "img.png", 100, 100, boxes, np.array([1, 2]), np.zeros(2, bool),
                      np.zeros(2, bool))
    scale_of = lambda b: ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) > 40 ** 2).astype(int)
    scales = [sampling.sample_scale_windows(rec, scale_of, 16, 0.25, 0.5, np.random.default_rng(seed), True)[0]
              for seed in range(40)]
    assert 10 <= scales.count(0) <= 30  # the degenerate box is drawn about half the time, and its scale is 0
