"""SPPNet wiring: conv5 once per scale, pool5 per window, fc7; R-CNN mode; build_model."""

import numpy as np
import pytest
import torch

from spp_det.errors import UserError
from spp_det.features.backbones import pad_to_minimum
from spp_det.features.scales import resize_image, scaled_sizes
from spp_det.features.rcnn import context_windows, rcnn_features
from spp_det.io import save_torch
from spp_det.model import FCHead, SPPNet, build_model
from spp_det.config import compose_config

from conftest import VOC_SAMPLE as SAMPLE  # one place (SPP_DET_VOC_SAMPLE overrides it)


def tiny_cfg(*overrides):
    return compose_config(["model=zf5_narrow", "model.width=0.05", "model.fc_dim=16", "model.scales=[48,64]",
                           "model.max_size=200", *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg().model).eval()


def image(h=60, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_conv5_is_one_map_per_scale(model):
    maps = model.conv5(image())
    # 60x80 resized to 48x64 and 64x85; ZF-5's (Caffe ceil-mode) arithmetic gives 2x3 and 3x4 cells
    assert [tuple(m.shape[2:]) for m in maps] == [(2, 3), (3, 4)]
    assert [model.backbone.conv5_size(48, 64), model.backbone.conv5_size(64, 85)] == [(2, 3), (3, 4)]
    assert all(m.shape[:2] == (1, model.backbone.out_channels) for m in maps)


def test_conv5_in_channels_last_equals_the_plain_nchw_network(model):
    # Backbone.body_input hands the conv layers NHWC memory for speed: same values as the layers on plain
    # NCHW input (up to float rounding), returned as an ordinary contiguous NCHW map for the pooling op
    img = image(90, 120, seed=3)
    size = scaled_sizes(90, 120, [64], 200)[0]
    with torch.no_grad():
        x = model.backbone.normalize(resize_image(img, size))
        plain = model.backbone.body(pad_to_minimum(x, model.backbone.min_input))
        fast = model.conv5_at(img, size)
    assert fast.is_contiguous() and fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_scales_capped_to_the_same_size_share_one_conv5_map():
    torch.manual_seed(0)
    capped = build_model(tiny_cfg("model.scales=[48,64,96]", "model.max_size=100").model).eval()
    calls = []
    hook = capped.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[2:])))
    with torch.no_grad():
        maps = capped.conv5(image(50, 100))  # 48 -> 48x96; 64 and 96 both capped to 50x100
    hook.remove()
    assert calls == [(48, 96), (50, 100)]
    assert len(maps) == 3 and maps[1] is maps[2] and maps[0] is not maps[1]


def test_features_give_pool5_and_fc7_of_the_documented_sizes(model):
    windows = torch.tensor([[0, 0, 80, 60], [10, 10, 30, 25], [5, 5, 5, 5]], dtype=torch.float32)
    pool5, fc7 = model.features(image(), windows)
    assert pool5.shape == (3, model.pool5_dim) == (3, model.backbone.out_channels * 50)
    assert fc7.shape == (3, model.head.out_dim) == (3, 16)
    assert pool5.dtype == fc7.dtype == torch.float32
    assert model.training is False
    # a window pooled alone gives the same vector as in a batch
    alone, _ = model.features(image(), windows[1:2])
    assert torch.allclose(alone[0], pool5[1])


def test_a_10x10_image_pools_to_the_same_vector_length(model):
    pool5, fc7 = model.features(image(10, 10), np.array([[0, 0, 10, 10], [2, 2, 2, 2]], np.float32))
    assert pool5.shape == (2, model.pool5_dim) and torch.isfinite(pool5).all()


def test_an_empty_window_list_returns_empty_tensors(model):
    pool5, fc7 = model.features(image(), np.zeros((0, 4), np.float32))
    assert pool5.shape == (0, model.pool5_dim) and fc7.shape == (0, model.head.out_dim)


def test_pool5_from_cached_fp16_maps_matches_fresh_maps(model):
    img, windows = image(), torch.tensor([[0, 0, 40, 40], [20, 10, 70, 55]], dtype=torch.float32)
    with torch.no_grad():
        maps = model.conv5(img)
        fresh = model.pool5(maps, img.shape[:2], windows)
        cached = model.pool5([m.half() for m in maps], img.shape[:2], windows)
    assert cached.dtype == torch.float32 and torch.allclose(fresh, cached, atol=1e-2, rtol=1e-2)


def test_gradients_reach_the_fc_layers_and_the_conv_layers(model):
    model.train()
    try:
        out = model(image(), torch.tensor([[0, 0, 50, 40]], dtype=torch.float32))
        out.sum().backward()
        assert model.head.fc6.weight.grad is not None
        assert model.backbone.body[0].weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_rcnn_mode_and_spp_mode_agree_in_shape_and_dtype(model):
    windows = torch.tensor([[0, 0, 80, 60], [10, 10, 30, 25], [70, 50, 80, 60]], dtype=torch.float32)
    spp = model.features(image(), windows)
    rcnn = rcnn_features(model, image(), windows, batch_size=2)
    for a, b in zip(spp, rcnn):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    empty = rcnn_features(model, image(), np.zeros((0, 4), np.float32))
    assert empty[0].shape == (0, model.pool5_dim) and empty[1].shape == (0, 16)


def test_rcnn_context_puts_the_window_16_px_inside_the_224_warp():
    boxes = context_windows(torch.tensor([[10.0, 20.0, 202.0, 116.0]]), 16, 224)
    # the window spans (224 - 32) / 224 of the dilated box on each axis
    assert torch.allclose((torch.tensor([192.0, 96.0])) / (boxes[0, 2:] - boxes[0, :2]), torch.tensor(192 / 224))


def test_head_is_fc6_relu_dropout_fc7_relu_dropout():
    head = FCHead(12, 8, 0.5)
    assert [type(m).__name__ for m in head.children()] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
    assert head.out_dim == 8 and head.drop6.p == 0.5
    head.eval()
    x = torch.randn(3, 12)
    assert torch.equal(head(x), head(x)) and (head(x) >= 0).all()


@pytest.mark.parametrize("backbone, channels", [("zf5", 256), ("alexnet", 256), ("vgg16", 512), ("resnet50", 1024)])
def test_build_model_for_every_backbone_without_downloading(backbone, channels):
    cfg = compose_config([f"model={backbone}", "model.weights=null", "model.fc_dim=8", "model.scales=[40]"])
    m = build_model(cfg.model).eval()
    assert isinstance(m, SPPNet) and m.backbone.stride == 16 and m.backbone.out_channels == channels
    assert m.pool5_dim == channels * 50
    pool5, fc7 = m.features(image(32, 40), np.array([[0, 0, 40, 32]], np.float32))
    assert pool5.shape == (1, channels * 50) and fc7.shape == (1, 8)


def test_backbone_checkpoint_loads_and_a_mismatched_one_is_refused(tmp_path):
    torch.manual_seed(1)
    source = build_model(tiny_cfg().model)
    path = tmp_path / "pretrain.pt"
    save_torch({"backbone": source.backbone.state_dict(), "meta": {}}, path)
    loaded = build_model(tiny_cfg(f"model.backbone_checkpoint={path}").model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.backbone.state_dict().values(),
                                                 source.backbone.state_dict().values()))
    with pytest.raises(UserError, match="pretrain.pt"):
        build_model(tiny_cfg(f"model.backbone_checkpoint={path}", "model.width=0.1").model)
    with pytest.raises(UserError, match="not found"):
        build_model(tiny_cfg(f"model.backbone_checkpoint={tmp_path / 'missing.pt'}").model)


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="model.backbone"):
        build_model(tiny_cfg("model.backbone=zf6").model)
    with pytest.raises(UserError, match="ZF-5 has no torchvision weights"):
        build_model(tiny_cfg("model.weights=IMAGENET1K_V1").model)
    with pytest.raises(UserError, match="model.projection"):
        build_model(tiny_cfg("model.projection=nearest").model)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"VOC sample not found at {SAMPLE}")
def test_features_stage_fills_the_cache_for_train_flips_and_test(tmp_path, caplog):
    from spp_det.stages import features as stage

    cfg = tiny_cfg(f"data.root={SAMPLE}", "data.year=2012", "data.train_split=all", "data.test_split=all",
                   "data.max_images=2", "data.flip=true", f"cache_dir={tmp_path}", "device=cpu")
    caplog.set_level("INFO")
    assert not stage.run(cfg)
    assert len(list((tmp_path / "conv5").rglob("*.pt"))) == 4  # 2 images + 2 flips (test split = same images)
    assert "per image" in caplog.text
    stage.run(cfg)
    assert "0 computed, 4 already cached" in caplog.text
