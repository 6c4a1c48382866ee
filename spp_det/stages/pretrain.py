"""``spp-det pretrain``: the backbone trained as an SPP classifier with multi-size training.

The paper's classification half (Sec. 2.3, 3.1): a whole image goes through the conv layers,
the spatial pyramid pools the *whole* conv5 map (one window covering every cell), and fc6, fc7
and a classifier layer score it. Because the pyramid gives a fixed-length vector at any input
size, one set of weights trains at several sizes: each full epoch uses one size and the next
epoch the other (224 and 180 in the paper; the demo uses small crops).

This is how a user without ImageNet weights (offline, or with a new kind of imagery) gets a
backbone: it trains on object crops of the detection dataset itself (``source=voc_crops``: every
non-difficult ground-truth object of the training split, padded by ``crop_context``, plus a
background class of random crops with IoU < 0.3 to every object) or on a class-per-folder image
set (``source=image_folder``). With ImageNet weights (``model.weights``) it is skipped.

``source=windows`` (not the paper) removes the crop/detection mismatch: the same layers plus a
(K+1)-way classifier train on windows pooled from conv5 of *whole* training images at their best
scale, exactly as ``SPPNet.pool5`` pools proposals (``sample_windows``, ``train_windows``).
``source=crops+windows`` runs ``voc_crops`` first (``work_dir/pretrain_crops.pt``) and then
``windows`` starting from those weights: crops teach the shapes cheaply, windows adapt the
features to whole-image pooling. ``pretrain.train_split`` may name a split detection never
trains on (the demo's extra synthetic ``pretrain`` images, standing in for ImageNet).

Writes ``work_dir/pretrain.pt`` = ``{"backbone": state_dict, "head": fc6/fc7 state_dict,
"classifier": state_dict, "meta": checkpoint_meta(cfg) + sizes + settings, "history": [...]}``
atomically; ``work_dir/pretrain_state.pt`` holds a resumable per-epoch checkpoint (weights,
optimizer, epoch) while it runs and is removed when the artifact is written.

Under ``torchrun`` crop training (``voc_crops``, ``image_folder``: the paper's ImageNet-style
pretraining) uses DistributedDataParallel: every rank builds the same mini-batch of ``batch_size``
crops and trains on every ``world_size``-th of them, the loss scaled so that the averaged gradient
is the whole batch's; the batch, epochs and lr schedule stay the configured ones. BatchNorm layers
(narrow ZF-5) normalise over each rank's share, as DDP does, not over the whole batch. Window
training (one image per step, not the paper) is not split: rank 0 runs it while the others wait.
Rank 0 writes the checkpoints and the artifact.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.boxes import box_iou, clip_boxes
from spp_det.errors import UserError
from spp_det.proposals import load_proposals, record_proposals
from spp_det.runtime import resolve_device
from spp_det.stages import declare
from spp_det.stages.curves import record_history

log = logging.getLogger(__name__)

ARTIFACT = "pretrain.pt"
STATE = "pretrain_state.pt"
CROPS_ARTIFACT = "pretrain_crops.pt"  # source=crops+windows: the first phase's weights, where the second starts
CROPS_STATE = "pretrain_crops_state.pt"
# settings only source=windows reads: a change to them keeps crops+windows' crop phase current
WINDOW_KEYS = ("windows_per_image", "fg_fraction", "fg_iou", "iterations", "iteration_lr_steps", "log_every",
               "start_from", "window_proposals", "frozen_convs")


# --------------------------------------------------------------------------------------------
# The classifier: backbone -> pyramid over the whole conv5 map -> fc6, fc7 -> classifier
# --------------------------------------------------------------------------------------------


def whole_map_pyramid(conv5: torch.Tensor, levels) -> torch.Tensor:
    """Spatial pyramid pooling of each *whole* map: ``Tensor[B, C, h, w]`` -> ``Tensor[B, C * sum(n*n)]``.

    One window per image covering every conv5 cell, pooled by the same op detection uses
    (``spp_det.ops.spatial_pyramid_pool``), so fc6 sees the same vector layout here as on
    projected windows later.
    """
    from spp_det.ops import spatial_pyramid_pool

    b, _, h, w = conv5.shape
    cells = torch.zeros(b, 5, dtype=torch.float32, device=conv5.device)
    cells[:, 0] = torch.arange(b, dtype=torch.float32, device=conv5.device)
    cells[:, 3], cells[:, 4] = w - 1, h - 1  # inclusive last cell indices
    return spatial_pyramid_pool(conv5, cells, levels=tuple(int(n) for n in levels))


def window_pyramid(conv5: torch.Tensor, windows: torch.Tensor, backbone, levels, rule: str = "paper") -> torch.Tensor:
    """Spatial pyramid pooling of one window per image: ``conv5 Tensor[B, C, h, w]`` and ``windows
    float Tensor[B, 4]`` (input pixels) -> ``Tensor[B, C * sum(n*n)]``, each window projected onto
    its map exactly as detection projects proposals (``spp_det.features.projection``)."""
    from spp_det.features.projection import project_windows
    from spp_det.ops import spatial_pyramid_pool

    cells = project_windows(windows.to(conv5.device), conv5.shape[-2:], backbone.stride, backbone.centre0, rule,
                            backbone.release_shrink).to(torch.float32)
    index = torch.arange(len(cells), dtype=torch.float32, device=conv5.device)[:, None]
    return spatial_pyramid_pool(conv5, torch.cat([index, cells], 1), levels=tuple(int(n) for n in levels))


class SPPClassifier(nn.Module):
    """``backbone`` -> ``pool`` (whole-map pyramid) -> ``head`` (fc6, fc7) -> ``classifier``.

    ``forward(images float Tensor[B, 3, S, S], backbone-normalised)`` -> logits ``Tensor[B, classes]``;
    any ``S`` works (that is the point of the pyramid). With ``windows`` ``float Tensor[B, 4]``
    (input pixels) and a ``window_pool``, each image's window is pooled instead of its whole map.
    """

    def __init__(self, backbone: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor], head: nn.Module,
                 num_classes: int, fc_dim: int, classifier_std: float = 0.01,
                 window_pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.window_pool = window_pool
        self.head = head
        self.classifier = nn.Linear(fc_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=classifier_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor:
        conv5 = self.backbone(images)
        pooled = self.pool(conv5) if windows is None or self.window_pool is None else self.window_pool(conv5, windows)
        return self.classifier(self.head(pooled))


def build_classifier(cfg: DictConfig, num_classes: int) -> tuple[SPPClassifier, Callable[[torch.Tensor], torch.Tensor]]:
    """The SPP classifier from ``cfg.model`` (fresh weights: pretraining starts from scratch) and
    the function that turns uint8 ``[B, 3, S, S]`` batches into the backbone's input."""
    from spp_det.model import build_model

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(weights=None, backbone_checkpoint=None, checkpoint=None)
    model = build_model(OmegaConf.create(model_cfg))
    if cfg.pretrain.get("init", "kaiming") == "kaiming":
        init_from_scratch(model.backbone)
    levels = tuple(int(n) for n in cfg.model.pyramid_levels)
    rule = str(cfg.model.get("projection", "paper"))
    classifier = SPPClassifier(model.backbone, lambda x: whole_map_pyramid(x, levels), model.head,
                               num_classes, model.head.out_dim,
                               window_pool=lambda x, w: window_pyramid(x, w, model.backbone, levels, rule))
    return classifier, _normaliser(model)


def init_from_scratch(backbone: nn.Module) -> None:
    """He (Kaiming) normal initialisation of the conv layers, zero biases.

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


def _normaliser(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``[B, 3, S, S]`` -> the backbone's float input, normalised as ``model.conv5`` does
    (the backbone's ``pixel_mean`` / ``pixel_std`` buffers: ZF-5 subtracts 128, torchvision nets
    use the ImageNet mean and std)."""
    backbone = model.backbone
    if hasattr(backbone, "pixel_mean") and hasattr(backbone, "pixel_std"):
        return lambda x: (x.float() - backbone.pixel_mean) / backbone.pixel_std
    mean = float(getattr(model, "pixel_mean", 128.0))
    return lambda x: x.float() - mean


# --------------------------------------------------------------------------------------------
# Data: object crops of a VOC-layout split, or an image-folder set
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CropSet:
    """Classification examples: ``get(i) -> uint8 Tensor[3, h, w]``, ``labels int64 [N]``,
    ``class_names`` (index 0 = background for VOC crops)."""

    get: Callable[[int], torch.Tensor]
    labels: np.ndarray
    class_names: list[str]
    windows: np.ndarray | None = None  # float32 [N, 4]: the object's box in each crop, fractions of its width/height

    def __len__(self) -> int:
        return len(self.labels)


def crop_boxes(
    records, crop_context: float, background_per_image: int, rng: np.random.Generator, use_difficult: bool = False
) -> list[tuple[int, np.ndarray, int, np.ndarray]]:
    """``(record index, crop box float32 [4], label, object box float32 [4])`` for every object crop
    and background crop (image pixels).

    Object crops: each (non-difficult) ground-truth box padded by ``crop_context`` of its width
    and height on every side, clipped to the image; label = its class (1..K).
    Background crops (label 0): ``background_per_image`` random boxes per image with IoU < 0.3
    to every object (R-CNN's negative threshold), sized like the dataset's objects so size is no cue.
    """
    out: list[tuple[int, np.ndarray, int]] = []
    sizes = [b[2:] - b[:2] for r in records for b in r.boxes]
    for i, rec in enumerate(records):
        keep = np.ones(len(rec.boxes), bool) if use_difficult else ~rec.difficult
        for box, label in zip(rec.boxes[keep], rec.labels[keep]):
            pad = (box[2:] - box[:2]) * crop_context
            padded = np.concatenate([box[:2] - pad, box[2:] + pad])
            out.append((i, clip_boxes(padded, rec.width, rec.height)[0], int(label), box.astype(np.float32)))
        for _ in range(background_per_image if sizes else 0):
            for _try in range(20):  # rejection sampling; a crowded image may give fewer
                w, h = sizes[rng.integers(len(sizes))]
                w, h = min(w, rec.width), min(h, rec.height)
                x, y = rng.uniform(0, rec.width - w), rng.uniform(0, rec.height - h)
                box = np.array([x, y, x + w, y + h], np.float32)
                if w >= 2 and h >= 2 and (len(rec.boxes) == 0 or box_iou(box[None], rec.boxes).max() < 0.3):
                    # its "object": the middle part an object crop's object would fill
                    inner = (box[2:] - box[:2]) * crop_context / (1 + 2 * crop_context)
                    out.append((i, box, 0, np.concatenate([box[:2] + inner, box[2:] - inner])))
                    break
    return out


def voc_crop_set(records, classes: list[str], pcfg, store_side: int, rng: np.random.Generator,
                 use_difficult: bool = False, desc: str = "crops") -> CropSet:
    """All crops of ``records`` cut once and kept in memory as uint8 ``[N, 3, store_side, store_side]``
    (warped to a square like R-CNN's windows; the training sizes are at most ``store_side``)."""
    boxes = crop_boxes(records, float(pcfg.crop_context),
                       int(pcfg.background_per_image) if pcfg.background_crops else 0, rng, use_difficult)
    by_image: dict[int, list[int]] = {}
    for j, (i, _, _, _) in enumerate(boxes):
        by_image.setdefault(i, []).append(j)
    crops = torch.zeros(len(boxes), 3, store_side, store_side, dtype=torch.uint8)
    windows = np.zeros((len(boxes), 4), np.float32)
    for i, js in tqdm(by_image.items(), desc=f"pretrain: {desc}", unit="image", leave=False):
        image = torch.tensor(records[i].load_image()).permute(2, 0, 1)  # [3, H, W] (a copy: the decoded array is read-only)
        for j in js:
            x1, y1, x2, y2 = boxes[j][1]
            top, left = int(math.floor(y1)), int(math.floor(x1))
            h, w = max(1, int(math.ceil(y2)) - top), max(1, int(math.ceil(x2)) - left)
            crops[j] = TF.resized_crop(image, top, left, h, w, [store_side, store_side], antialias=True)
            obj = boxes[j][3]
            windows[j] = np.clip(((obj - [left, top, left, top]) / [w, h, w, h]), 0, 1)
    labels = np.array([lab for _, _, lab, _ in boxes], np.int64)
    return CropSet(lambda j: crops[j], labels, ["__background__", *classes], windows)


def image_folder_sets(root: str | Path, store_side: int, holdout_every: int = 10) -> tuple[CropSet, CropSet]:
    """A class-per-folder set (torchvision ``ImageFolder``), read lazily; every ``holdout_every``-th
    image is held out to measure accuracy. Images are resized so the shorter side is ``store_side``
    and centre-cropped square."""
    from torchvision.datasets import ImageFolder

    from spp_det.data.images import read_image

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"pretrain.image_folder={root}: folder not found")
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"pretrain.image_folder={root}: not a class-per-folder image set ({exc})") from None

    def load(idx: int) -> torch.Tensor:
        image = torch.tensor(read_image(folder.samples[idx][0])).permute(2, 0, 1)
        image = TF.resize(image, [store_side], antialias=True)
        return TF.center_crop(image, [store_side, store_side])

    targets = np.array(folder.targets, np.int64)
    val = np.arange(len(targets)) % holdout_every == 0
    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    return (CropSet(lambda j: load(int(train_idx[j])), targets[train_idx], list(folder.classes)),
            CropSet(lambda j: load(int(val_idx[j])), targets[val_idx], list(folder.classes)))


def make_batch(crops: CropSet, indices: np.ndarray, size: int, train: bool, scale_jitter: float,
               generator: torch.Generator, channel_shuffle: bool = False, return_windows: bool = False):
    """uint8 ``[B, 3, size, size]`` and labels ``int64 [B]`` (and with ``return_windows`` the
    object's box in each output image, ``float32 Tensor[B, 4]`` pixels, from ``crops.windows``:
    moved with the random crop and the flip; the whole image when the set has none).

    Training: a random crop of ``scale_jitter``..1 of the area (aspect 3/4..4/3), resized to
    ``size``, mirrored with probability 1/2, and with ``channel_shuffle`` its RGB channels in a
    random order (colour augmentation for data whose classes do not depend on colour).
    Evaluation: the whole crop resized to ``size``.
    """
    out = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    wins = torch.zeros(len(indices), 4)
    for k, j in enumerate(indices):
        image = crops.get(int(j))
        _, h, w = image.shape
        frac = crops.windows[int(j)] if crops.windows is not None else np.array([0, 0, 1, 1], np.float32)
        win = torch.tensor(frac * [w, h, w, h], dtype=torch.float32)  # stored-crop pixels
        if train:
            if channel_shuffle:
                image = image[torch.randperm(3, generator=generator)]
            u = torch.rand(5, generator=generator).tolist()
            area = h * w * (scale_jitter + (1 - scale_jitter) * u[0])
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            cw = min(w, max(1, round(math.sqrt(area * aspect))))
            ch = min(h, max(1, round(math.sqrt(area / aspect))))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            image = TF.resized_crop(image, top, left, ch, cw, [size, size], antialias=True)
            win = ((win - torch.tensor([left, top, left, top])) * torch.tensor([size / cw, size / ch] * 2)).clamp(0, size)
            if u[4] < 0.5:
                image = image.flip(-1)
                win = torch.stack([size - win[2], win[1], size - win[0], win[3]])
        else:
            image = TF.resize(image, [size, size], antialias=True)
            win = win * torch.tensor([size / w, size / h] * 2)
        out[k] = image
        wins[k] = win
    labels = torch.from_numpy(crops.labels[np.asarray(indices, np.int64)])
    return (out, labels, wins) if return_windows else (out, labels)


@torch.no_grad()
def accuracy(model: SPPClassifier, normalise, crops: CropSet, size: int, device, batch_size: int = 128,
             object_pool: bool = False) -> float:
    """Top-1 accuracy of ``model`` on every example of ``crops`` at input ``size`` (eval mode);
    ``object_pool``: pool the object's window, not the whole map."""
    if len(crops) == 0:
        return float("nan")
    model.eval()
    correct = 0
    g = torch.Generator().manual_seed(0)
    for start in range(0, len(crops), batch_size):
        idx = np.arange(start, min(start + batch_size, len(crops)))
        images, labels, windows = make_batch(crops, idx, size, False, 1.0, g, return_windows=True)
        logits = model(normalise(images.to(device)), windows.to(device) if object_pool else None)
        correct += int((logits.argmax(1).cpu() == labels).sum())
    return correct / len(crops)


# --------------------------------------------------------------------------------------------
# The training loop (multi-size, resumable)
# --------------------------------------------------------------------------------------------


def lr_at(epoch: int, lr: float, lr_steps, gamma: float) -> float:
    """Step schedule: ``lr * gamma ** (number of steps <= epoch)``."""
    return lr * gamma ** sum(int(epoch >= s) for s in lr_steps)


def resume(state_path: Path | None, settings: str, module: nn.Module, optimizer, unit: str) -> tuple[int, list]:
    """Load the resumable checkpoint at ``state_path`` into ``module`` and ``optimizer`` when it was
    written with the same ``settings``; returns (first ``unit`` to run, history so far)."""
    if state_path is None or not state_path.is_file():
        return 0, []
    state = io.load_torch(state_path)
    if state.get("settings") != settings:
        log.info("pretrain: %s was written with other settings; starting over", state_path)
        return 0, []
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["epoch"]) + 1
    log.info("pretrain: resuming from %s after %s %d", state_path, unit, start)
    return start, list(state["history"])


def save_state(state_path: Path | None, settings: str, module: nn.Module, optimizer, done: int,
               history: list) -> None:
    """Write the resumable checkpoint ``resume`` reads (``done``: the last finished epoch or block)."""
    if state_path is not None:
        io.save_torch({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": done,
                       "history": history, "settings": settings}, state_path)


def make_optimizer(model: nn.Module, pcfg) -> torch.optim.Optimizer:
    """``pcfg.optimizer``: ``sgd`` (the paper's recipe: momentum, weight decay) or ``adam`` (not the
    paper: Adam with decoupled weight decay, for short from-scratch CPU runs that SGD makes too slow)."""
    name = str(pcfg.get("optimizer", "sgd"))
    params = [p for p in model.parameters() if p.requires_grad]  # not the fixed ones (frozen_convs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=float(pcfg.lr), momentum=float(pcfg.momentum),
                               weight_decay=float(pcfg.weight_decay))
    if name == "adam":
        return torch.optim.AdamW(params, lr=float(pcfg.lr), weight_decay=float(pcfg.weight_decay))
    raise UserError(f"pretrain.optimizer={name!r}: use sgd or adam")


def train_classifier(
    model: SPPClassifier,
    normalise,
    train_set: CropSet,
    val_set: CropSet,
    pcfg,
    device: torch.device,
    seed: int,
    state_path: Path | None = None,
    settings: str = "",
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` for ``pcfg.epochs`` epochs, epoch ``e`` at input size ``sizes[e % len(sizes)]``
    (multi-size training, Sec. 2.3), SGD with momentum and weight decay (or Adam, ``pcfg.optimizer``). Each epoch's shuffling,
    augmentation and dropout are seeded from ``(seed, epoch)``, and a checkpoint (weights,
    optimizer, epoch, history) goes to ``state_path`` after each epoch, so a restarted run
    continues where it stopped and ends with the same weights. Returns the per-epoch history
    ``[{"epoch", "size", "lr", "loss", "val_acc", "seconds"}]``.
    """
    sizes = [int(s) for s in pcfg.sizes]
    model.to(device)
    optimizer = make_optimizer(model, pcfg)
    start, history = resume(state_path, settings, model, optimizer, "epoch")
    if not distributed.is_main():
        state_path = None  # rank 0 writes the checkpoints
    net = distributed.ddp(model, device)  # model itself in one process
    n, bs = len(train_set), int(pcfg.batch_size)
    object_pool = str(pcfg.get("pool", "image")) == "object"
    for epoch in range(start, int(pcfg.epochs)):
        t0 = time.perf_counter()
        size = sizes[epoch % len(sizes)]
        lr = lr_at(epoch, float(pcfg.lr), pcfg.get("lr_steps", []), float(pcfg.get("lr_gamma", 0.1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch + 1_000_000_007 * distributed.rank())  # dropout, each rank its own
        order = torch.randperm(n, generator=g).numpy()
        model.train()
        total, count = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"pretrain epoch {epoch + 1}/{pcfg.epochs} size {size}",
                   unit="batch", leave=False)
        for s in bar:
            images, labels, windows = make_batch(train_set, order[s:s + bs], size, True, float(pcfg.scale_jitter), g,
                                                 bool(pcfg.get("channel_shuffle", False)), return_windows=True)
            if distributed.active():  # this rank's rows of the same batch; averaged gradients = the whole batch's
                share, scale = distributed.batch_share(len(labels)), distributed.loss_scale(len(labels))
                logits = net(normalise(images[share].to(device)), windows[share].to(device) if object_pool else None)
                loss = F.cross_entropy(logits, labels[share].to(device), reduction="sum") * scale
            else:
                logits = model(normalise(images.to(device)), windows.to(device) if object_pool else None)
                loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise UserError(f"pretrain: the loss became {loss.item()} at epoch {epoch + 1}; lower pretrain.lr "
                                f"(now {pcfg.lr})")
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.3f}")
        entry = {"epoch": epoch, "size": size, "lr": lr, "loss": total / max(count, 1),
                 "val_acc": accuracy(model, normalise, val_set, sizes[0], device, object_pool=object_pool),
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        log.info("pretrain epoch %d/%d: size %d, lr %.4g, loss %.4f, held-out accuracy %.3f (%.1f s)",
                 epoch + 1, pcfg.epochs, size, lr, entry["loss"], entry["val_acc"], entry["seconds"])
        save_state(state_path, settings, model, optimizer, epoch, history)
        if on_epoch is not None:
            on_epoch(epoch, entry)
    return history


# the data keys pretraining reads (on its own splits when pretrain.train_split / val_split are set)
PRETRAIN_DATA = tuple(f"data.{k}" for k in ("root", "year", "train_split", "val_split", "val_fraction", "classes",
                                            "use_difficult", "max_images"))
CROPS = declare.Stage(
    "pretrain_crops", ARTIFACT, reads=("pretrain", "model", *PRETRAIN_DATA, "seed"),
    # crops never pool windows the way detection does: its scales and projection do not matter
    ignores=(*(f"pretrain.{k}" for k in WINDOW_KEYS), "model.backbone_checkpoint", "model.scales", "model.max_size",
             "model.best_scale_area", "model.projection"),
    paper="Sec. 2.3 / 3.1 classification pretraining, multi-size")
WINDOWS = declare.Stage(
    "pretrain_windows", ARTIFACT, reads=("pretrain", "model", *PRETRAIN_DATA, "seed"),
    consumes=("start_from", "proposals"),  # pretrain.start_from's weights, not its name
    ignores=("model.backbone_checkpoint", "pretrain.start_from"),
    paper="not the paper: windows pooled as detection pools them (configs/pretrain)")


def settings_key(cfg: DictConfig, phase: declare.Stage | None = None) -> str:
    """The settings key of pretraining's ``phase`` (``CROPS`` or ``WINDOWS``; default: the one
    ``pretrain.source`` ends with), derived from its declaration (``spp_det.stages.declare``)."""
    if phase is None:
        phase = WINDOWS if cfg.pretrain.get("source") in ("windows", "crops+windows") else CROPS
    if phase is CROPS:
        return declare.settings_key(cfg, CROPS)
    start = cfg.pretrain.get("start_from")
    return declare.settings_key(cfg, WINDOWS, {
        "start_from": Path(start) if start and Path(start).is_file() else None,
        "proposals": declare.proposals_cache(window_proposals_cfg(cfg))})  # the boxes change the windows


def window_proposals_cfg(cfg: DictConfig) -> DictConfig | None:
    """``proposals`` with ``pretrain.window_proposals``' overrides: how window training's background
    boxes are computed; None when it is unset."""
    over = cfg.pretrain.get("window_proposals")
    return OmegaConf.merge(cfg.proposals, over) if over else None


def run(cfg: DictConfig, on_epoch: Callable[[int, dict], None] | None = None) -> int:
    """Pretrain the backbone (see the module docstring); ``on_epoch(epoch, entry)`` is called after
    each epoch (tests use it to interrupt a run). Returns 0."""
    pcfg = cfg.pretrain
    if cfg.model.get("weights"):
        log.info("pretrain: skipped: model.weights=%s gives an ImageNet-trained backbone", cfg.model.weights)
        return 0
    if not pcfg.enabled:
        log.info("pretrain: skipped: pretrain.enabled=false (conv layers keep their initial weights "
                 "unless model.backbone_checkpoint is set)")
        return 0
    work_dir = Path(cfg.work_dir)
    artifact, state_path = work_dir / ARTIFACT, work_dir / STATE
    settings = settings_key(cfg)
    if io.artifact_is_current(artifact, settings):
        log.info("pretrain: %s is current; skipped", artifact)
        return 0
    if pcfg.source == "windows":
        return run_windows(cfg, artifact, state_path, settings, on_epoch)
    if pcfg.source == "crops+windows":  # crops first, then windows starting from them
        crops_cfg = OmegaConf.merge(cfg, {"pretrain": {"source": "voc_crops"}})
        crops_artifact, crops_settings = work_dir / CROPS_ARTIFACT, settings_key(crops_cfg, CROPS)
        if io.artifact_is_current(crops_artifact, crops_settings):
            log.info("pretrain: %s is current; window training starts from it", crops_artifact)
        else:
            run_crops(crops_cfg, crops_artifact, work_dir / CROPS_STATE, crops_settings, on_epoch)
        return run_windows(cfg, artifact, state_path, settings, on_epoch, start=crops_artifact)
    return run_crops(cfg, artifact, state_path, settings, on_epoch)


def pretrain_data(cfg: DictConfig) -> DictConfig:
    """``cfg.data`` with ``pretrain.train_split`` / ``pretrain.val_split`` in place of the data's
    splits when set: the backbone may pretrain on a split detection never trains on (the demo's
    ``pretrain`` split of extra synthetic images, standing in for ImageNet)."""
    return OmegaConf.merge(cfg.data, {k: cfg.pretrain[k] for k in ("train_split", "val_split") if cfg.pretrain.get(k)})


def run_crops(cfg: DictConfig, artifact: Path, state_path: Path, settings: str,
              on_epoch: Callable[[int, dict], None] | None = None) -> int:
    """``source=voc_crops`` or ``image_folder``: the multi-size crop classifier; writes ``artifact``."""
    pcfg = cfg.pretrain
    sizes = [int(s) for s in pcfg.sizes]
    object_pool = str(pcfg.get("pool", "image")) == "object"
    if str(pcfg.get("pool", "image")) not in ("image", "object"):
        raise UserError(f"pretrain.pool={pcfg.pool!r}: use image or object")
    if object_pool and pcfg.source != "voc_crops":
        raise UserError("pretrain.pool=object needs pretrain.source=voc_crops (object boxes)")
    if not sizes or min(sizes) < 16:
        raise UserError(f"pretrain.sizes={sizes}: give one or more input sizes of at least 16 px")
    device = resolve_device(cfg.device)
    torch.manual_seed(int(cfg.seed))
    rng = np.random.default_rng(int(cfg.seed))
    store_side = int(round(max(sizes) * 1.15))  # room for the scale jitter's random crops
    t0 = time.perf_counter()
    if pcfg.source == "voc_crops":
        from spp_det.data.voc import train_val_split

        classes = list(cfg.data.classes)
        data = pretrain_data(cfg)
        train_records, val_records = train_val_split(data)
        use_difficult = bool(cfg.data.get("use_difficult", False))
        train_set = voc_crop_set(train_records, classes, pcfg, store_side, rng, use_difficult, "training crops")
        val_set = voc_crop_set(val_records, classes, pcfg, store_side, rng, use_difficult, "held-out crops")
        missing = [c for k, c in enumerate(classes, 1) if not (train_set.labels == k).any()]
        if missing:
            raise UserError(f"pretrain: no training object of class {', '.join(missing)} in "
                            f"{data.root} split {data.train_split}")
    elif pcfg.source == "image_folder":
        if not pcfg.image_folder:
            raise UserError("pretrain.source=image_folder needs pretrain.image_folder=DIR (class-per-folder images)")
        train_set, val_set = image_folder_sets(pcfg.image_folder, store_side)
    else:
        raise UserError(f"pretrain.source={pcfg.source!r}: use voc_crops, image_folder, windows or crops+windows")
    counts = np.bincount(train_set.labels, minlength=len(train_set.class_names))
    log.info("pretrain: %d training and %d held-out examples; per class %s",
             len(train_set), len(val_set), dict(zip(train_set.class_names, counts.tolist())))
    if len(train_set) == 0:
        raise UserError(f"pretrain: no training examples (source={pcfg.source})")

    model, normalise = build_classifier(cfg, len(train_set.class_names))
    history = train_classifier(model, normalise, train_set, val_set, pcfg, device, int(cfg.seed),
                               state_path, settings, on_epoch)
    record_history(cfg, "pretrain_crops", [{"step": h["epoch"] + 1, "lr": h["lr"], "loss": h["loss"], "size": h["size"],
                                            "val_accuracy": h["val_acc"], "seconds": h["seconds"]} for h in history])
    final_acc = {int(s): accuracy(model, normalise, val_set, int(s), device, object_pool=object_pool) for s in sizes}
    meta = {**io.checkpoint_meta(cfg), "sizes": sizes, "settings": settings,
            "class_names": train_set.class_names, "source": str(pcfg.source)}
    if distributed.is_main():  # one writer; the others wait below until the artifact is there
        model.cpu()
        io.save_torch({"backbone": model.backbone.state_dict(), "head": model.head.state_dict(),
                       "classifier": model.classifier.state_dict(), "meta": meta, "history": history,
                       "val_acc": final_acc}, artifact)
        state_path.unlink(missing_ok=True)
        log.info("pretrain: wrote %s in %.1f s; held-out accuracy by input size %s", artifact,
                 time.perf_counter() - t0, {s: round(a, 4) for s, a in final_acc.items()})
    distributed.barrier()
    return 0


# --------------------------------------------------------------------------------------------
# source=windows (not the paper): windows pooled from conv5 of whole training images
# --------------------------------------------------------------------------------------------


def jitter_boxes(boxes: np.ndarray, n: int, max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` random copies of random rows of ``boxes`` ``float32 [N, 4]``: centre shifted by up to
    ``max_shift`` of the width/height, width and height scaled by ``exp(U(-max_shift, max_shift))``.
    Returns ``float32 [n, 4]`` (not clipped)."""
    src = boxes[rng.integers(len(boxes), size=n)].astype(np.float64)
    wh = src[:, 2:] - src[:, :2]
    centre = (src[:, :2] + src[:, 2:]) / 2 + wh * rng.uniform(-max_shift, max_shift, (n, 2))
    wh = wh * np.exp(rng.uniform(-max_shift, max_shift, (n, 2)))
    return np.concatenate([centre - wh / 2, centre + wh / 2], 1).astype(np.float32)


def random_boxes(width: int, height: int, n: int, min_side: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` boxes ``float32 [n, 4]`` inside a ``width x height`` image, sides log-uniform between
    ``min_side`` and the image side (objects and proposals span that range)."""
    sides = np.exp(rng.uniform(np.log(min_side), np.log([max(width, min_side + 1), max(height, min_side + 1)]),
                               (n, 2)))
    sides = np.minimum(sides, [width, height])
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - sides)
    return np.concatenate([xy, xy + sides], 1).astype(np.float32)


def sample_windows(rec, scale_of: Callable[[np.ndarray], np.ndarray], windows_per_image: int, fg_fraction: float,
                   fg_iou: float, rng: np.random.Generator, use_difficult: bool = False,
                   proposals: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Training windows of one image, sampled like detection's (R-CNN/SPP fine-tuning, Sec. 3.1.2 of
    the SPP paper: 25% foreground with IoU >= 0.5 to a ground-truth box, labelled with its class; the
    rest background, IoU < 0.5, label 0), all of ONE scale: ``(scale index, boxes float32 [K, 4]
    image pixels, labels int64 [K])``.

    ``scale_of(boxes [M, 4]) -> int [M]`` gives each window's best scale (``SPPNet``'s rule); the
    scale is that of a random ground-truth object (a random one when the image has none), and only
    candidates whose best scale it is are kept, so every window is pooled on the map detection would
    pool it on. Foreground: the ground-truth boxes and jittered copies; background: random boxes and
    jittered copies that fall below ``fg_iou``. ``proposals`` (``float32 [P, 4]`` of this image,
    as ``rec`` is: mirrored with it) and jittered copies of them join the candidates: the object-like
    non-objects (distractors, parts of objects) detection will have to reject.
    """
    keep = np.ones(len(rec.boxes), bool) if use_difficult else ~rec.difficult
    gt, gt_labels = rec.boxes[keep].astype(np.float32), rec.labels[keep]
    min_side = 8.0
    candidates = [random_boxes(rec.width, rec.height, 400, min_side, rng)]
    if len(gt):
        candidates += [gt, jitter_boxes(gt, 300, 0.25, rng), jitter_boxes(gt, 200, 0.6, rng)]
    if proposals is not None and len(proposals):
        candidates += [proposals, jitter_boxes(proposals, 400, 0.1, rng)]
    boxes = clip_boxes(np.concatenate(candidates), rec.width, rec.height)
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(wh >= 2).all(1)]
    scales = scale_of(boxes)
    if len(gt):
        iou = box_iou(boxes, gt)
        best, arg = iou.max(1), iou.argmax(1)
        labels = np.where(best >= fg_iou, gt_labels[arg], 0).astype(np.int64)
        # a ground-truth box's best scale, computed from the box itself: boxes were filtered above, so a
        # position in ``boxes`` no longer names a ground-truth box
        j = int(rng.integers(len(gt)))
        s = int(scale_of(clip_boxes(gt[j:j + 1], rec.width, rec.height))[0])
    else:
        labels = np.zeros(len(boxes), np.int64)
        s = int(scales[rng.integers(len(scales))])
    on_scale = scales == s
    fg, bg = np.flatnonzero(on_scale & (labels > 0)), np.flatnonzero(on_scale & (labels == 0))
    n_fg = min(len(fg), int(round(windows_per_image * fg_fraction)))
    n_bg = min(len(bg), windows_per_image - n_fg)
    pick = np.concatenate([rng.choice(fg, n_fg, replace=False), rng.choice(bg, n_bg, replace=False)]).astype(np.int64)
    return s, boxes[pick], labels[pick]


class WindowTrainer:
    """Backbone + pyramid + fc6/fc7 + a (K+1)-way classifier trained on windows pooled from conv5
    of whole images at one of ``model.scales``, exactly as detection pools them (``SPPNet.pool5``'s
    projection and pyramid, ``SPPNet.conv5``'s resize and normalisation, with gradients)."""

    def __init__(self, model, classifier: nn.Linear, frozen: list[nn.Module] = ()):
        self.model, self.classifier, self.frozen = model, classifier, list(frozen)

    def train(self) -> None:
        """Training mode, except for the ``frozen`` layers (``freeze_leading_convs``): they stay in eval
        mode, so their BatchNorms use and keep their running statistics."""
        self.model.train()
        self.classifier.train()
        for module in self.frozen:
            module.eval()

    def scale_sizes(self, rec):
        from spp_det.features.scales import scaled_sizes

        return scaled_sizes(rec.height, rec.width, self.model.scales, self.model.max_size)

    def scale_of(self, rec) -> Callable[[np.ndarray], np.ndarray]:
        from spp_det.features.scales import best_scale

        sizes = self.scale_sizes(rec)
        return lambda boxes: best_scale(torch.from_numpy(boxes), sizes, self.model.best_scale_area).numpy()

    def sample(self, rec, pcfg, rng: np.random.Generator, use_difficult: bool,
               proposals: dict[str, np.ndarray] | None) -> tuple[int, np.ndarray, np.ndarray]:
        """``sample_windows`` of ``rec`` with ``pcfg``'s settings at this model's scales; ``proposals``
        (``{image_id: float32 [P, 4]}``, unflipped, or None) add their windows."""
        return sample_windows(rec, self.scale_of(rec), int(pcfg.windows_per_image), float(pcfg.fg_fraction),
                              float(pcfg.fg_iou), rng, use_difficult,
                              None if proposals is None else record_proposals(rec, proposals))

    def logits(self, image: np.ndarray, rec, s: int, boxes: np.ndarray) -> torch.Tensor:
        """``image`` uint8 ``[H, W, 3]`` at scale index ``s`` -> logits ``Tensor[K, classes]`` of
        ``boxes`` ``[K, 4]`` (image pixels), all pooled on that scale's conv5 map."""
        from spp_det.features.projection import project_windows
        from spp_det.features.scales import resize_image, scale_windows

        m = self.model
        size = self.scale_sizes(rec)[s]
        fmap = m.backbone(m.backbone.normalize(resize_image(image, size)))  # SPPNet.conv5, with gradients
        windows = torch.from_numpy(boxes).to(fmap.device)
        cells = project_windows(scale_windows(windows, size), fmap.shape[-2:], m.backbone.stride,
                                m.backbone.centre0, m.projection, m.backbone.release_shrink)
        cells = torch.cat([cells.new_zeros((cells.shape[0], 1)), cells], dim=1)  # as SPPNet.pool5
        return self.classifier(m.head(m.pyramid(fmap, cells)))


def window_accuracy(trainer: WindowTrainer, records, pcfg, seed: int, use_difficult: bool = False,
                    proposals: dict[str, np.ndarray] | None = None) -> float:
    """Accuracy on windows of ``records`` sampled as in training (fixed seed; ``proposals`` by image
    id as in ``train_windows``), in eval mode: the fraction of held-out windows (foreground and
    background) classified right; nan without records."""
    if not records:
        return float("nan")
    rng = np.random.default_rng(seed)
    right = total = 0
    trainer.model.eval()
    with torch.no_grad():
        for rec in records:
            s, boxes, labels = trainer.sample(rec, pcfg, rng, use_difficult, proposals)
            if len(boxes):
                pred = trainer.logits(rec.load_image(), rec, s, boxes).argmax(1).cpu().numpy()
                right += int((pred == labels).sum())
                total += len(labels)
    trainer.train()
    return right / max(total, 1)


def train_windows(trainer: WindowTrainer, train_records, val_records, pcfg, seed: int,
                  state_path: Path | None = None, settings: str = "", use_difficult: bool = False,
                  on_epoch: Callable[[int, dict], None] | None = None,
                  proposals: dict[str, np.ndarray] | None = None) -> list[dict]:
    """``pcfg.iterations`` steps, each on one training image (mirrored with probability 1/2) at the
    best scale of one of its objects, ``windows_per_image`` windows, cross-entropy, ``pcfg.optimizer``;
    lr times ``lr_gamma`` at each of ``pcfg.iteration_lr_steps``. Every ``pcfg.log_every`` steps a
    history entry ``{"epoch", "iteration", "lr", "loss", "val_acc", "seconds"}`` (mean training loss
    since the last entry) is logged and a resumable checkpoint goes to ``state_path``; the sampling
    of each block is seeded from ``(seed, block)``, so a restarted run ends with the same weights."""
    params = nn.ModuleList([trainer.model, trainer.classifier])
    optimizer = make_optimizer(params, pcfg)
    iterations, every = int(pcfg.iterations), max(1, int(pcfg.log_every))
    start, history = resume(state_path, settings, params, optimizer, "block")
    trainer.train()
    blocks = -(-iterations // every)
    for block in range(start, blocks):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, block])
        torch.manual_seed(seed * 100_003 + block)  # dropout
        total, count = 0.0, 0
        bar = tqdm(range(block * every, min(iterations, (block + 1) * every)),
                   desc=f"pretrain windows {block + 1}/{blocks}", unit="it", leave=False)
        for it in bar:
            lr = lr_at(it, float(pcfg.lr), pcfg.get("iteration_lr_steps", []), float(pcfg.get("lr_gamma", 0.1)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            rec = train_records[int(rng.integers(len(train_records)))]
            if rng.random() < 0.5:
                rec = rec.flip()
            s, boxes, labels = trainer.sample(rec, pcfg, rng, use_difficult, proposals)
            if len(boxes) == 0:
                continue
            logits = trainer.logits(rec.load_image(), rec, s, boxes)
            loss = F.cross_entropy(logits, torch.from_numpy(labels).to(logits.device))
            if not torch.isfinite(loss):
                raise UserError(f"pretrain: the loss became {loss.item()} at iteration {it + 1}; lower pretrain.lr "
                                f"(now {pcfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        last = block == blocks - 1
        entry = {"epoch": block, "iteration": min(iterations, (block + 1) * every), "lr": lr,
                 "loss": total / max(count, 1),
                 "val_acc": window_accuracy(trainer, val_records, pcfg, seed, use_difficult, proposals)
                 if last or pcfg.get("val_every_block", False) else None,
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        log.info("pretrain windows: iteration %d/%d, lr %.4g, loss %.4f, held-out window accuracy %s (%.1f s)",
                 entry["iteration"], iterations, lr, entry["loss"],
                 "-" if entry["val_acc"] is None else f"{entry['val_acc']:.3f}", entry["seconds"])
        save_state(state_path, settings, params, optimizer, block, history)
        if on_epoch is not None:
            on_epoch(block, entry)
    return history


def start_from(path: Path, model, classifier: nn.Linear) -> None:
    """Initialise backbone, fc6/fc7 and (when its shape fits) the classifier from an earlier
    ``pretrain.pt`` (e.g. crop pretraining), so window training refines features instead of
    learning them from nothing."""
    if not path.is_file():
        raise UserError(f"pretrain.start_from={path}: file not found")
    state = io.load_torch(path)
    if not {"backbone", "head"} <= set(state):
        raise UserError(f"pretrain.start_from={path}: not a pretrain.pt (no backbone/head weights)")
    try:
        model.backbone.load_state_dict(state["backbone"])
        model.head.load_state_dict(state["head"])
    except RuntimeError as exc:
        raise UserError(f"pretrain.start_from={path}: weights do not fit model={model.__class__.__name__} "
                        f"({str(exc).splitlines()[0]})") from None
    if state.get("classifier", {}).get("weight", torch.empty(0)).shape == classifier.weight.shape:
        classifier.load_state_dict(state["classifier"])
    log.info("pretrain: window training starts from %s", path)


def freeze_leading_convs(backbone: nn.Module, n: int) -> list[nn.Module]:
    """Fix the first ``n`` conv layers of ``backbone`` and every layer before its ``n + 1``-th conv
    (their norms), in module order: ``requires_grad=False`` on their parameters. Returns those (leaf)
    modules, which must also stay in eval mode (``WindowTrainer.train``): a BatchNorm in training mode
    normalises by the batch's statistics and keeps updating its running ones, so it would not be fixed.

    Why: the first layers learn generic edges and blobs, and their backward pass at full image
    resolution costs most of a step (Fast R-CNN, Sec. 4.5, fixes conv1 for the same reasons)."""
    if n <= 0:
        return []
    convs, fixed = 0, []
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            convs += 1
            if convs > n:
                return fixed
        if next(module.children(), None) is None:  # a leaf layer; containers hold later layers too
            module.requires_grad_(False)
            fixed.append(module)
    if convs < n:
        raise UserError(f"pretrain.frozen_convs={n}, but the backbone has {convs} conv layers")
    return fixed


def run_windows(cfg: DictConfig, artifact: Path, state_path: Path, settings: str,
                on_epoch: Callable[[int, dict], None] | None = None, start: Path | None = None) -> int:
    """``source=windows``: train on windows of whole training images and write ``artifact``,
    starting from ``pretrain.start_from`` or ``start`` (a crop-pretrained ``pretrain.pt``) when given."""
    from spp_det.data.voc import train_val_split
    from spp_det.model import build_model

    pcfg = cfg.pretrain
    if int(pcfg.iterations) < 1 or not 0 < float(pcfg.fg_fraction) <= 1 or int(pcfg.windows_per_image) < 1:
        raise UserError(f"pretrain: source=windows needs iterations >= 1, windows_per_image >= 1 and 0 < fg_fraction "
                        f"<= 1 (got {pcfg.iterations}, {pcfg.windows_per_image}, {pcfg.fg_fraction})")
    t0 = time.perf_counter()
    classes = list(cfg.data.classes)
    data = pretrain_data(cfg)
    train_records, val_records = train_val_split(data)
    if not train_records:
        raise UserError(f"pretrain: no training images in {data.root} split {data.train_split}")
    if not distributed.is_main():  # window training is not split over ranks: wait for rank 0's artifact
        distributed.barrier()
        return 0
    use_difficult = bool(cfg.data.get("use_difficult", False))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(weights=None, backbone_checkpoint=None, checkpoint=None)
    model = build_model(OmegaConf.create(model_cfg)).to(resolve_device(cfg.device))
    classifier = nn.Linear(model.head.out_dim, len(classes) + 1)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    if pcfg.get("start_from") or start is not None:
        start_from(Path(pcfg.get("start_from") or start), model, classifier)
    elif pcfg.get("init", "kaiming") == "kaiming":
        init_from_scratch(model.backbone)
    classifier.to(model.device)
    frozen = freeze_leading_convs(model.backbone, int(pcfg.get("frozen_convs", 0)))
    if frozen:
        log.info("pretrain: the first %d conv layers (%d parameters) stay fixed, in eval mode", int(pcfg.frozen_convs),
                 sum(p.numel() for m in frozen for p in m.parameters()))
    trainer = WindowTrainer(model, classifier, frozen)
    log.info("pretrain: windows of %d training images (%d held out), %d iterations of %d windows at scales %s",
             len(train_records), len(val_records), int(pcfg.iterations), int(pcfg.windows_per_image),
             list(model.scales))
    proposals, proposals_cfg = None, window_proposals_cfg(cfg)
    if proposals_cfg is not None:  # selective search, cached like detection's
        log.info("pretrain: proposals of the pretraining images with %s",
                 OmegaConf.to_container(pcfg.window_proposals, resolve=True))
        proposals = load_proposals(train_records + val_records, proposals_cfg, cfg.cache_dir,
                                   workers=int(cfg.get("num_workers", 0)), progress=True)
    history = train_windows(trainer, train_records, val_records, pcfg, int(cfg.seed), state_path, settings,
                            use_difficult, on_epoch, proposals)
    record_history(cfg, "pretrain_windows", [{"step": h["iteration"], "lr": h["lr"], "loss": h["loss"],
                                              "val_accuracy": h["val_acc"], "seconds": h["seconds"]} for h in history])
    meta = {**io.checkpoint_meta(cfg), "sizes": list(model.scales), "settings": settings,
            "class_names": ["__background__", *classes], "source": "windows"}
    model.cpu()
    classifier.cpu()
    val_acc = history[-1]["val_acc"] if history and history[-1]["val_acc"] is not None else float("nan")
    io.save_torch({"backbone": model.backbone.state_dict(), "head": model.head.state_dict(),
                   "classifier": classifier.state_dict(), "meta": meta, "history": history,
                   "val_acc": {"windows": val_acc}}, artifact)
    state_path.unlink(missing_ok=True)
    log.info("pretrain: wrote %s in %.1f s; held-out window accuracy %.3f", artifact, time.perf_counter() - t0, val_acc)
    distributed.barrier()
    return 0
