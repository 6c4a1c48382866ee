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

Writes ``work_dir/pretrain.pt`` = ``{"backbone": state_dict, "head": fc6/fc7 state_dict,
"classifier": state_dict, "meta": checkpoint_meta(cfg) + sizes + settings, "history": [...]}``
atomically; ``work_dir/pretrain_state.pt`` holds a resumable per-epoch checkpoint (weights,
optimizer, epoch) while it runs and is removed when the artifact is written.
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

from spp_det import io
from spp_det.boxes import box_iou, clip_boxes
from spp_det.errors import UserError
from spp_det.runtime import resolve_device

log = logging.getLogger(__name__)

ARTIFACT = "pretrain.pt"
STATE = "pretrain_state.pt"


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


def make_optimizer(model: nn.Module, pcfg) -> torch.optim.Optimizer:
    """``pcfg.optimizer``: ``sgd`` (the paper's recipe: momentum, weight decay) or ``adam`` (not the
    paper: Adam with decoupled weight decay, for short from-scratch CPU runs that SGD makes too slow)."""
    name = str(pcfg.get("optimizer", "sgd"))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=float(pcfg.lr), momentum=float(pcfg.momentum),
                               weight_decay=float(pcfg.weight_decay))
    if name == "adam":
        return torch.optim.AdamW(model.parameters(), lr=float(pcfg.lr), weight_decay=float(pcfg.weight_decay))
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
    history: list[dict] = []
    start = 0
    if state_path is not None and state_path.is_file():
        state = io.load_torch(state_path)
        if state.get("settings") == settings:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]) + 1, list(state["history"])
            log.info("pretrain: resuming from %s after epoch %d", state_path, start)
        else:
            log.info("pretrain: %s was written with other settings; starting over", state_path)
    n, bs = len(train_set), int(pcfg.batch_size)
    object_pool = str(pcfg.get("pool", "image")) == "object"
    for epoch in range(start, int(pcfg.epochs)):
        t0 = time.perf_counter()
        size = sizes[epoch % len(sizes)]
        lr = lr_at(epoch, float(pcfg.lr), pcfg.get("lr_steps", []), float(pcfg.get("lr_gamma", 0.1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch)  # dropout
        order = torch.randperm(n, generator=g).numpy()
        model.train()
        total, count = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"pretrain epoch {epoch + 1}/{pcfg.epochs} size {size}",
                   unit="batch", leave=False)
        for s in bar:
            images, labels, windows = make_batch(train_set, order[s:s + bs], size, True, float(pcfg.scale_jitter), g,
                                                 bool(pcfg.get("channel_shuffle", False)), return_windows=True)
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
        if state_path is not None:
            io.save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                           "history": history, "settings": settings}, state_path)
        if on_epoch is not None:
            on_epoch(epoch, entry)
    return history


def settings_key(cfg: DictConfig) -> str:
    """Hash of every setting that changes the pretrained weights."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for k in ("checkpoint", "backbone_checkpoint", "scales", "max_size", "best_scale_area", "projection",
              "rcnn_context", "rcnn_input"):
        model.pop(k, None)  # detection-time settings: do not change the classifier
    data = {k: cfg.data.get(k) for k in ("root", "year", "train_split", "val_split", "val_fraction", "classes",
                                          "use_difficult", "max_images")}
    return io.hash_settings({"pretrain": cfg.pretrain, "model": model, "data": data, "seed": cfg.seed})


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
    if artifact.is_file():
        meta = io.load_torch(artifact).get("meta", {})
        if meta.get("settings") == settings:
            log.info("pretrain: %s is current; skipped", artifact)
            return 0
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
        train_records, val_records = train_val_split(cfg.data)
        use_difficult = bool(cfg.data.get("use_difficult", False))
        train_set = voc_crop_set(train_records, classes, pcfg, store_side, rng, use_difficult, "training crops")
        val_set = voc_crop_set(val_records, classes, pcfg, store_side, rng, use_difficult, "held-out crops")
        missing = [c for k, c in enumerate(classes, 1) if not (train_set.labels == k).any()]
        if missing:
            raise UserError(f"pretrain: no training object of class {', '.join(missing)} in "
                            f"{cfg.data.root} split {cfg.data.train_split}")
    elif pcfg.source == "image_folder":
        if not pcfg.image_folder:
            raise UserError("pretrain.source=image_folder needs pretrain.image_folder=DIR (class-per-folder images)")
        train_set, val_set = image_folder_sets(pcfg.image_folder, store_side)
    else:
        raise UserError(f"pretrain.source={pcfg.source!r}: use voc_crops or image_folder")
    counts = np.bincount(train_set.labels, minlength=len(train_set.class_names))
    log.info("pretrain: %d training and %d held-out examples; per class %s",
             len(train_set), len(val_set), dict(zip(train_set.class_names, counts.tolist())))
    if len(train_set) == 0:
        raise UserError(f"pretrain: no training examples (source={pcfg.source})")

    model, normalise = build_classifier(cfg, len(train_set.class_names))
    history = train_classifier(model, normalise, train_set, val_set, pcfg, device, int(cfg.seed),
                               state_path, settings, on_epoch)
    final_acc = {int(s): accuracy(model, normalise, val_set, int(s), device, object_pool=object_pool) for s in sizes}
    meta = {**io.checkpoint_meta(cfg), "sizes": sizes, "settings": settings,
            "class_names": train_set.class_names, "source": str(pcfg.source)}
    model.cpu()
    io.save_torch({"backbone": model.backbone.state_dict(), "head": model.head.state_dict(),
                   "classifier": model.classifier.state_dict(), "meta": meta, "history": history,
                   "val_acc": final_acc}, artifact)
    state_path.unlink(missing_ok=True)
    log.info("pretrain: wrote %s in %.1f s; held-out accuracy by input size %s", artifact,
             time.perf_counter() - t0, {s: round(a, 4) for s, a in final_acc.items()})
    return 0
