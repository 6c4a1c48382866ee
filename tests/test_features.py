"""Backbones, scales, best scale, projection onto conv5, the conv5 cache."""
import numpy as np
import pytest
import torch
from PIL import Image

from spp_det.data.voc import ImageRecord
from spp_det.features.backbones import ZF5, AlexNetConv5, minimum_input, output_size, receptive_field
from spp_det.features.cache import FeatureCache, weights_hash
from spp_det.features.projection import project_windows
from spp_det.features.scales import best_scale, scaled_sizes
from spp_det.model import build_model
from spp_det.config import compose_config
from spp_det.settings import RunSettings


def test_zf5_has_stride_16_and_the_release_cell_centres():
    zf5 = ZF5(width=0.05)
    # the release's offset0 = 21 (1-based pixel of cell 1's centre) is pixel 20 0-based
    assert (zf5.stride, zf5.centre0) == (16, 20.0)
    assert receptive_field([(3, 1, 1, False)] * 3) == (1, 0.0)
    assert AlexNetConv5().centre0 == 15.0


def test_zf5_conv5_sizes_follow_caffe_ceil_pooling():
    zf5 = ZF5(width=0.05).eval()
    with torch.no_grad():
        assert zf5(torch.zeros(1, 3, 224, 224)).shape[-2:] == (13, 13)  # the release's sz_conv_standard = 13
        assert zf5(torch.zeros(1, 3, 64, 100)).shape[-2:] == zf5.conv5_size(64, 100) == (3, 5)
    assert output_size(688, zf5.layers) == 42


def test_zf5_width_multiplier_scales_channels_with_a_floor_of_8():
    assert ZF5(width=1.0).out_channels == 256
    assert ZF5(width=0.25).out_channels == 64
    assert ZF5(width=0.01).out_channels == 8


def test_tiny_images_are_padded_to_at_least_one_conv5_cell():
    zf5 = ZF5(width=0.05).eval()
    assert output_size(zf5.min_input - 1, zf5.layers) == 0 and output_size(zf5.min_input, zf5.layers) == 1
    assert minimum_input(zf5.layers) == zf5.min_input == 39
    with torch.no_grad():
        assert zf5(zf5.normalize(np.zeros((10, 10, 3), np.uint8))).shape == (1, zf5.out_channels, 1, 1)


def test_zf5_batchnorm_option_replaces_lrn_and_keeps_the_geometry():
    from spp_det.errors import UserError
    from spp_det.features.backbones import WithinChannelLRN
    from spp_det.model.weights import build_backbone
    from omegaconf import OmegaConf

    paper, bn = ZF5(width=0.05), ZF5(width=0.05, norm="batchnorm")
    assert sum(isinstance(m, WithinChannelLRN) for m in paper.body) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paper.body)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.body) == 5
    assert not any(isinstance(m, WithinChannelLRN) for m in bn.body)
    assert (bn.stride, bn.centre0, bn.min_input) == (paper.stride, paper.centre0, paper.min_input)
    with torch.no_grad():
        assert bn.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, bn.out_channels, 13, 13)
    # eval mode uses the running statistics: an image's conv5 does not depend on its batch
    x = torch.randn(3, 3, 80, 80)
    with torch.no_grad():
        assert torch.allclose(bn(x)[:1], bn(x[:1]), atol=1e-5)
    cfg = compose_config(["model=zf5_narrow", "model.norm=batchnorm"]).model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_backbone(cfg).body)
    with pytest.raises(UserError, match="model.norm"):
        build_backbone(OmegaConf.merge(cfg, {"norm": "groupnorm"}))


def test_zf5_normalisation_subtracts_128():
    x = ZF5(width=0.05).normalize(np.full((2, 3, 3), 130, np.uint8))
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32 and torch.all(x == 2.0)


def test_shorter_side_goes_to_the_scale_and_max_size_caps_the_longer():
    (s,) = scaled_sizes(375, 500, [688])
    assert (s.height, s.width) == (688, 917)
    (s,) = scaled_sizes(100, 1000, [688], max_size=2000)
    assert (s.height, s.width) == (200, 2000)


def test_best_scale_is_the_one_whose_scaled_area_is_closest_to_224_squared():
    sizes = scaled_sizes(375, 500, [480, 688])  # factors 1.28 and 1.8347
    windows = torch.tensor([[0, 0, 100, 100], [0, 0, 300, 300], [10, 10, 185, 185], [0, 0, 0, 0]], dtype=torch.float32)
    # 175^2 * 1.28^2 = 50176 exactly; a zero-area window ties everywhere: the first scale
    assert best_scale(windows, sizes, 224 ** 2).tolist() == [1, 0, 0, 0]
    assert best_scale(windows, sizes[:1], 224 ** 2).tolist() == [0, 0, 0, 0]


ZF5_MAP = (42, 56)  # conv5 of a 688 x 917 image
S, C = 16, 20.0  # ZF-5: stride 16, cell j centred at pixel 16 j + 20


def paper_cells_by_enumeration(x1: float, x2: float, n: int) -> list[int]:
    """The paper's rule written out, independently of the code: the cells (of ``n``) whose
    receptive-field centres ``S j + C`` lie strictly inside ``(x1, x2)``."""
    return [j for j in range(n) if x1 < S * j + C < x2]


def project(window, rule="paper", map_hw=ZF5_MAP):
    return project_windows(torch.tensor([window], dtype=torch.float64), map_hw, S, C, rule, 6.5)[0].tolist()


@pytest.mark.parametrize("rule, window, cells", [
    # paper: cells with centres strictly inside. x: centres 116, 132, 148 lie in (100, 164); 100 is on the edge
    ("paper", [100, 36, 164, 100], [6, 2, 8, 4]),     # y: centres 52, 68 in (36, 100); 36 and 100 on the edges
    ("paper", [99.9, 35.9, 164.1, 100.1], [5, 1, 9, 5]),  # a hair outside the centres takes them in
    ("paper", [0, 0, 917, 688], [0, 0, 55, 41]),      # whole image: every cell (last centres 900 and 676)
    ("paper", [300, 300, 300, 300], [17, 17, 17, 17]),  # no centre inside: the middle of the crossed edges
    ("paper", [900, 680, 917, 688], [55, 41, 55, 41]),  # bottom-right corner: stays on the map
    ("release", [0, 0, 917, 688], [0, 0, 55, 41]),
    ("release", [100, 36, 164, 100], [5, 1, 9, 5]),   # snapped to the nearest centres 16j+20 after 6.5 px
    ("release", [300, 300, 300, 300], [17, 17, 17, 17]),
    ("release", [-50, -50, 10, 10], [0, 0, 0, 0]),    # outside the image on the left/top: clamped
])
def test_projection_of_hand_computed_windows(rule, window, cells):
    assert project(window, rule) == cells


def test_paper_rule_keeps_exactly_the_cells_whose_centres_lie_inside_the_window():
    H, W = 60, 80
    gen = torch.Generator().manual_seed(0)
    extent = torch.tensor([S * (W - 1) + 2 * C, S * (H - 1) + 2 * C], dtype=torch.float64)
    a = torch.rand(3000, 2, generator=gen, dtype=torch.float64) * extent
    b = torch.rand(3000, 2, generator=gen, dtype=torch.float64) * extent
    windows = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    windows[:200] = windows[:200].round()  # some edges on integer pixels, hence on cell centres
    cells = project_windows(windows, (H, W), S, C, "paper")
    checked = 0
    for w, c in zip(windows.tolist(), cells.tolist()):
        xs, ys = paper_cells_by_enumeration(w[0], w[2], W), paper_cells_by_enumeration(w[1], w[3], H)
        if xs and ys:  # windows holding at least one centre each way; the others collapse (next test)
            assert c == [xs[0], ys[0], xs[-1], ys[-1]], w
            checked += 1
    assert checked > 2000


def test_a_window_symmetric_about_a_cell_centre_projects_to_cells_symmetric_about_that_cell():
    centre = S * 10 + C
    for half in (0.5, 1.0, 1.5, 2.0, 3.5, 5.25):  # in cells
        x1, x2 = centre - half * S, centre + half * S
        lo, _, hi, _ = project([x1, x1, x2, x2])
        assert 10 - lo == hi - 10, (half, lo, hi)
    assert project([centre - 3.5 * S, 0, centre + 3.5 * S, 0])[::2] == [7, 13]  # the example


def test_the_whole_image_projects_to_every_cell_whose_centre_lies_inside_it():
    for h, w in ((688, 917), (480, 640), (224, 224), (300, 1200)):
        zf5 = ZF5(width=0.05)
        H, W = zf5.conv5_size(h, w)
        cells = project([0, 0, w, h], map_hw=(H, W))
        xs, ys = paper_cells_by_enumeration(0, w, W), paper_cells_by_enumeration(0, h, H)
        assert cells == [xs[0], ys[0], xs[-1], ys[-1]] == [0, 0, W - 1, H - 1]


def test_a_mirrored_window_on_a_mirrored_image_gives_the_mirrored_cells():
    H, W = 30, 40
    width = S * (W - 1) + 2 * C  # the map's centres are symmetric about the image's middle
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.rand(2000, generator=gen, dtype=torch.float64) * width for _ in range(2))
    x1, x2 = torch.minimum(a, b), torch.maximum(a, b)
    y = torch.zeros_like(x1)
    windows = torch.stack([x1, y, x2, y + 100], 1)
    mirrored = torch.stack([width - x2, y, width - x1, y + 100], 1)
    c, m = project_windows(windows, (H, W), S, C, "paper"), project_windows(mirrored, (H, W), S, C, "paper")
    # a collapsed window (no centre inside) keeps floor((lo + hi) / 2), which mirrors only when lo + hi is
    # even; every window that holds a cell is mirrored exactly
    held = torch.tensor([bool(paper_cells_by_enumeration(u, v, W)) for u, v in zip(x1.tolist(), x2.tolist())])
    assert held.sum() > 1500
    assert torch.equal(c[held, 0], W - 1 - m[held, 2]) and torch.equal(c[held, 2], W - 1 - m[held, 0])


def test_projection_never_leaves_the_map_and_never_collapses():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen) * 1000 - 50
    wh = torch.rand(500, 2, generator=gen) ** 3 * 600
    windows = torch.cat([xy, xy + wh], dim=1)
    for rule in ("paper", "release"):
        c = project_windows(windows, ZF5_MAP, 16, 20.0, rule)
        assert (c[:, 0] >= 0).all() and (c[:, 1] >= 0).all() and (c[:, 2] <= 55).all() and (c[:, 3] <= 41).all()
        assert (c[:, 2] >= c[:, 0]).all() and (c[:, 3] >= c[:, 1]).all()


# ---------------------------------------------------------------- feature cache


def tiny_model(scales=(64,)):
    cfg = compose_config(["model=zf5_narrow", "model.width=0.05", "model.fc_dim=16", f"model.scales=[{','.join(map(str, scales))}]"])
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def tiny_record(tmp_path, name="img", seed=0):
    path = tmp_path / f"{name}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return ImageRecord(name, path, 50, 40, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                       np.zeros(0, bool), np.zeros(0, bool))


def test_feature_cache_hit_miss_and_invalidation(tmp_path):
    record = tiny_record(tmp_path)
    cache = FeatureCache(tmp_path / "cache", tiny_model())
    maps = cache.conv5(record)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 0
    assert len(maps) == 1 and maps[0].dtype == torch.float16 and maps[0].device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(maps[0].float(), cache.model.conv5(record.load_image())[0], atol=1e-2, rtol=1e-2)

    again = FeatureCache(tmp_path / "cache", tiny_model())  # a new process, same settings and weights
    assert torch.equal(again.conv5(record)[0], maps[0]) and again.stats == {**again.stats, "hits": 1, "misses": 0}
    assert again.bytes_per_image() > 0

    flipped = again.conv5(record.flip())  # the mirrored image is another entry
    assert again.stats["misses"] == 1 and not torch.equal(flipped[0], maps[0])

    other_scales = FeatureCache(tmp_path / "cache", tiny_model(scales=(64, 80)))
    assert len(other_scales.conv5(record)) == 2 and other_scales.stats["misses"] == 1

    retrained = tiny_model()
    with torch.no_grad():
        retrained.backbone.body[0].bias.add_(1.0)
    assert weights_hash(retrained.backbone) != weights_hash(tiny_model().backbone)
    changed = FeatureCache(tmp_path / "cache", retrained)
    changed.conv5(record)
    assert changed.stats["misses"] == 1

    # an edited image file is a new key
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(record.path)
    assert not again.contains(record)


def test_without_the_conv5_cache_every_call_computes_the_same_maps_and_nothing_is_written(tmp_path):
    record = tiny_record(tmp_path)
    stored = FeatureCache(tmp_path / "stored", tiny_model()).conv5(record)
    cache = FeatureCache(tmp_path / "cache", tiny_model(), store=False)
    first, second = cache.conv5(record), cache.conv5(record)
    assert torch.equal(first[0], stored[0]) and torch.equal(second[0], stored[0])
    assert cache.stats["misses"] == 2 and cache.stats["hits"] == 0
    assert not (tmp_path / "cache").exists() and not cache.contains(record)


def test_the_features_stage_caches_train_flips_and_val_but_not_test(tmp_path):
    from conftest import write_voc
    from spp_det.stages.features import split_records

    root = tmp_path / "voc"
    obj = [("circle", (5, 5, 30, 30), False)]
    for split, ids in (("train", ["a", "b"]), ("val", ["c"]), ("test", ["d", "e"])):
        write_voc(root, {i: {"objects": obj} for i in ids}, split)
    cfg = compose_config(["data=synth", "data.flip=true", f"data.root={root}", "data.val_split=val"])
    got = [(r.image_id, r.flipped) for r in split_records(RunSettings.of(cfg))]
    assert got == [("a", False), ("a", True), ("b", False), ("b", True), ("c", False)]
