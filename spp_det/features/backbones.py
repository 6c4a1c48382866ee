"""Convolutional backbones up to conv5 (stride 16), each declaring what the projection needs.

Every backbone is an ``nn.Module`` mapping a normalised image ``Tensor[N, 3, H, W]`` to conv5
``Tensor[N, out_channels, h, w]`` with

* ``stride``: conv5 cell spacing in input pixels (16 for all of them);
* ``centre0``: the 0-based pixel index of the receptive-field centre of conv5 cell 0 (cell ``j``
  is centred at pixel ``stride * j + centre0``), derived from the layers' kernel/stride/padding by
  :func:`receptive_field` (ZF-5: 20, i.e. the release's ``offset0 = 21`` in 1-based pixels);
* ``min_input``: the smallest input side giving a 1 x 1 conv5 map; ``forward`` pads smaller
  inputs at the bottom/right with zeros (= the mean after normalisation), which leaves the
  coordinates of the real pixels unchanged, so any image down to 1 x 1 pools to a full vector;
* ``normalize(image uint8 [H, W, 3]) -> Tensor[1, 3, H, W] float32``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spp_det.errors import UserError

# ImageNet statistics of torchvision's weights (their transforms' mean/std, RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A layer as (kernel, stride, padding, ceil_mode) for receptive-field arithmetic.
LayerSpec = tuple[int, int, int, bool]


def receptive_field(layers: Sequence[LayerSpec]) -> tuple[int, float]:
    """``(stride, centre0)`` of the last layer's cells in input pixels.

    A cell ``i`` of a layer (kernel k, stride s, padding p) reads inputs ``s*i - p .. s*i - p + k - 1``,
    centred at ``s*i - p + (k - 1) / 2``; composing gives ``centre(i) = stride * i + centre0``.
    """
    stride, centre0 = 1, 0.0
    for k, s, p, _ in layers:
        centre0 += stride * (-p + (k - 1) / 2)
        stride *= s
    return stride, centre0


def output_size(size: int, layers: Sequence[LayerSpec]) -> int:
    """Side of the last layer's map for an input side ``size`` (0 when the input is too small)."""
    for k, s, p, ceil_mode in layers:
        span = size + 2 * p - k
        if span < 0:
            return 0
        out = (math.ceil(span / s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:  # PyTorch drops a last window starting in the padding
            out -= 1
        size = out
    return size


def minimum_input(layers: Sequence[LayerSpec]) -> int:
    """The smallest input side whose conv5 map is at least 1 cell."""
    size = 1
    while output_size(size, layers) < 1:
        size += 1
    return size


class Backbone(nn.Module):
    """Common part: normalisation, small-input padding, the projection constants."""

    stride: int
    centre0: float
    min_input: int
    out_channels: int
    # The release shrinks a window by this many pixels before snapping its edges to cell centres
    # (``offset = 6.5`` in the original SPP_net code, for ZF-5; used as-is for other nets).
    release_shrink: float = 6.5

    def __init__(self, layers: Sequence[LayerSpec], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.layers = list(layers)
        self.stride, self.centre0 = receptive_field(layers)
        self.min_input = minimum_input(layers)
        # mean/std per channel on the 0..255 pixel scale
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, image: np.ndarray | Tensor) -> Tensor:
        """RGB ``uint8 [H, W, 3]`` -> ``float32 [1, 3, H, W]`` on the backbone's device, normalised."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image  # copy: may be read-only
        if x.dim() != 3 or x.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got shape {tuple(x.shape)}")
        x = x.to(self.pixel_mean.device).permute(2, 0, 1)[None].float()
        return (x - self.pixel_mean) / self.pixel_std

    def pad_to_minimum(self, x: Tensor) -> Tensor:
        """Zero-pad (bottom/right) an input smaller than ``min_input`` so conv5 has >= 1 cell."""
        h, w = x.shape[-2:]
        if h >= self.min_input and w >= self.min_input:
            return x
        return F.pad(x, (0, max(0, self.min_input - w), 0, max(0, self.min_input - h)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.pad_to_minimum(x))

    def conv5_size(self, height: int, width: int) -> tuple[int, int]:
        """conv5 ``(h, w)`` for an input ``height x width`` (after the minimum-size padding)."""
        return (output_size(max(height, self.min_input), self.layers),
                output_size(max(width, self.min_input), self.layers))


class WithinChannelLRN(nn.Module):
    """Caffe's LRN with ``norm_region: WITHIN_CHANNEL`` (the release's ZF-5 prototxt):
    ``x / (1 + alpha * mean_{size x size}(x^2)) ** beta`` over a spatial window, zero-padded."""

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        self.size, self.alpha, self.beta = int(size), float(alpha), float(beta)

    def forward(self, x: Tensor) -> Tensor:
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1.0 + self.alpha * mean_sq).pow(self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


def _width(channels: int, width: float) -> int:
    return max(8, int(round(channels * width)))


class ZF5(Backbone):
    """ZF-5 as in the SPP-net paper (Table 1) and the release's ``Zeiler_conv5.prototxt``.

    conv1 96x7x7 stride 2 pad 1, ReLU, LRN, max-pool 3/2; conv2 256x5x5 stride 2 pad 0, ReLU,
    LRN, max-pool 3/2; conv3 384, conv4 384, conv5 256 (3x3 pad 1, ReLU). Pools round up
    (``ceil_mode``) as Caffe's do, so a 688 x 917 image gives a 42 x 56 conv5 map and a
    224 x 224 window 13 x 13 (the release's ``sz_conv_standard = 13``). ``width`` scales all
    channel counts (rounded, at least 8) for small CPU configurations. ``norm="batchnorm"``
    (not the paper) puts BatchNorm after every conv instead of LRN: a from-scratch CPU demo
    trains in minutes with it; ``"lrn"`` (default) is the paper's network.
    """

    def __init__(self, width: float = 1.0, pixel_mean: float = 128.0, lrn: dict | None = None, norm: str = "lrn"):
        layers: list[LayerSpec] = [(7, 2, 1, False), (3, 2, 0, True), (5, 2, 0, False), (3, 2, 0, True),
                                        (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, False)]
        # The paper subtracts a constant mean (128) and does not divide: std 1.
        super().__init__(layers, (pixel_mean,) * 3, (1.0,) * 3)
        if norm not in NORMS:
            raise UserError(f"model.norm={norm!r}: choose one of {', '.join(NORMS)}")
        self.norm = norm
        lrn = dict(lrn or {})
        c1, c2, c3, c4, c5 = (_width(c, width) for c in (96, 256, 384, 384, 256))

        def conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 1, with_lrn: bool = False) -> list:
            # lrn (the paper): conv -> ReLU [-> LRN after conv1, conv2]; batchnorm (not the paper, a
            # CPU-demo option): conv -> BN -> ReLU on every conv, no LRN. BN is used in eval mode
            # (running statistics) everywhere but pretraining, where the conv layers are trained;
            # afterwards they are fixed, so BN is then just a per-channel affine map.
            if norm == "batchnorm":
                return [nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(cout),
                        nn.ReLU(inplace=True)]
            return [nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.ReLU(inplace=True),
                    *([WithinChannelLRN(**lrn)] if with_lrn else [])]

        self.body = nn.Sequential(
            *conv(3, c1, 7, stride=2, padding=1, with_lrn=True), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            *conv(c1, c2, 5, stride=2, padding=0, with_lrn=True), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            *conv(c2, c3, 3), *conv(c3, c4, 3), *conv(c4, c5, 3),
        )
        self.out_channels = c5


class AlexNetConv5(Backbone):
    """torchvision AlexNet ``features`` up to conv5 + ReLU (before the last max-pool): stride 16."""

    def __init__(self, weights: str | None = None):
        import torchvision

        w = torchvision.models.AlexNet_Weights[weights] if weights else None
        net = torchvision.models.alexnet(weights=w)
        layers = [(11, 4, 2, False), (3, 2, 0, False), (5, 1, 2, False), (3, 2, 0, False),
                       (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = net.features[:12]
        self.out_channels = 256


class VGG16Conv5(Backbone):
    """torchvision VGG-16 up to conv5_3 + ReLU (before the last max-pool): stride 16."""

    def __init__(self, weights: str | None = None):
        import torchvision

        w = torchvision.models.VGG16_Weights[weights] if weights else None
        net = torchvision.models.vgg16(weights=w)
        conv = (3, 1, 1, False)
        pool = (2, 2, 0, False)
        layers = [conv, conv, pool, conv, conv, pool, conv, conv, conv, pool, conv, conv, conv, pool,
                       conv, conv, conv]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = net.features[:30]
        self.out_channels = 512


class ResNet50Conv4(Backbone):
    """torchvision ResNet-50 through ``layer3`` (conv4_x): stride 16, 1024 channels."""

    def __init__(self, weights: str | None = None):
        import torchvision

        w = torchvision.models.ResNet50_Weights[weights] if weights else None
        net = torchvision.models.resnet50(weights=w)
        # stem conv 7/2 pad 3, max-pool 3/2 pad 1; layer2 and layer3 stride 2 on their 3x3 convs (pad 1)
        layers = [(7, 2, 3, False), (3, 2, 1, False), (3, 2, 1, False), (3, 2, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.out_channels = 1024


NORMS = ("lrn", "batchnorm")

BACKBONES = {"zf5": ZF5, "alexnet": AlexNetConv5, "vgg16": VGG16Conv5, "resnet50": ResNet50Conv4}


def build_backbone(model_cfg) -> Backbone:
    """The backbone named by ``model.backbone`` with ``model.weights`` (torchvision enum name, or
    None: random initialisation, nothing is downloaded)."""
    name = str(model_cfg.backbone)
    weights = model_cfg.get("weights")
    if name not in BACKBONES:
        raise UserError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "zf5":
        if weights:
            raise UserError(f"model.weights={weights!r}: ZF-5 has no torchvision weights; set model.weights=null "
                            "and train it with `spp-det pretrain` (model.backbone_checkpoint)")
        mean = model_cfg.get("pixel_mean")
        lrn = model_cfg.get("lrn")
        return ZF5(width=float(model_cfg.get("width", 1.0)), pixel_mean=128.0 if mean is None else float(mean),
                   lrn=dict(lrn) if lrn is not None else None, norm=str(model_cfg.get("norm") or "lrn"))
    try:
        return BACKBONES[name](weights=str(weights) if weights else None)
    except KeyError:
        raise UserError(f"model.weights={weights!r} is not a torchvision weights name for {name} "
                        "(e.g. IMAGENET1K_V1)") from None
