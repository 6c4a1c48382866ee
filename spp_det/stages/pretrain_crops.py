"""Pretraining, crop phase (``pretrain.source=voc_crops`` or ``image_folder``; the first phase of
``crops+windows``): the backbone trained as an SPP image classifier with multi-size training.

The paper's classification half (Sec. 2.3, 3.1): a whole image goes through the conv layers,
the spatial pyramid pools the *whole* conv5 map (one window covering every cell), and fc6, fc7
and a classifier layer score it. Because the pyramid gives a fixed-length vector at any input
size, one set of weights trains at several sizes: each full epoch uses one size and the next
epoch the other (224 and 180 in the paper; the demo uses small crops). The examples are object
crops of the detection dataset or a class-per-folder image set (``spp_det.training.crops``).

Under ``torchrun`` crop training (the paper's ImageNet-style pretraining) uses
DistributedDataParallel: every rank builds the same mini-batch of ``batch_size`` crops and trains
on every ``world_size``-th of them, the loss scaled so that the averaged gradient is the whole
batch's; the batch, epochs and lr schedule stay the configured ones. BatchNorm layers (narrow
ZF-5) normalise over each rank's share, as DDP does, not over the whole batch. Rank 0 writes the
checkpoints and the artifact.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.data.voc import train_val_split
from spp_det.errors import UserError
from spp_det.model import SPPClassifier, build_model, init_from_scratch
from spp_det.model.sppnet import whole_map_pyramid
from spp_det.runtime import resolve_device
from spp_det.settings import DataSettings, PretrainSettings, RunSettings
from spp_det.stages.curves import record_history
from spp_det.training.crops import CropSet, image_folder_sets, make_batch, voc_crop_set
from spp_det.training.loop import Step, StepLoop, lr_at, make_optimizer, optimizer_step

log = logging.getLogger(__name__)

# torch seed of epoch e: seed * SEED_STRIDE + e (the one pretraining always used: same artifacts as before)
SEED_STRIDE = 100_003


def build_classifier(rs: RunSettings, num_classes: int) -> tuple[SPPClassifier, Callable[[torch.Tensor], torch.Tensor]]:
    """The SPP classifier from ``rs.model`` (fresh weights: pretraining starts from scratch) and
    the function that turns uint8 ``[B, 3, S, S]`` batches into the backbone's input. Its
    ``window_pool`` (``pretrain.pool=object``) pools each image's object window as detection pools
    a proposal (``SPPNet.pool5_at``)."""
    model = build_model(rs.model, pretrained=False)
    if rs.pretrain.init == "kaiming":
        init_from_scratch(model.backbone)
    levels = rs.model.pyramid_levels
    classifier = SPPClassifier(
        model.backbone, lambda x: whole_map_pyramid(x, levels), model.head, num_classes=num_classes,
        fc_dim=model.head.out_dim,
        window_pool=lambda x, w: model.pool5_at(x, w, batch_index=torch.arange(len(w), device=x.device)))
    return classifier, _normaliser(model)


def _normaliser(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 ``[B, 3, S, S]`` -> the backbone's float input, normalised as ``model.conv5`` does
    (the backbone's ``pixel_mean`` / ``pixel_std`` buffers: ZF-5 subtracts 128, torchvision nets
    use the ImageNet mean and std)."""
    backbone = model.backbone
    if hasattr(backbone, "pixel_mean") and hasattr(backbone, "pixel_std"):
        return lambda x: (x.float() - backbone.pixel_mean) / backbone.pixel_std
    mean = float(getattr(model, "pixel_mean", 128.0))
    return lambda x: x.float() - mean


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


def train_classifier(
    model: SPPClassifier,
    normalise,
    train_set: CropSet,
    val_set: CropSet,
    pcfg,
    device: torch.device,
    seed: int,
    state_path: Path | None = None,
    key: str = "",
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` for ``pcfg.epochs`` epochs, epoch ``e`` at input size ``sizes[e % len(sizes)]``
    (multi-size training, Sec. 2.3), SGD with momentum and weight decay (or Adam, ``pcfg.optimizer``).
    Each epoch is a step of ``spp_det.training.loop``: its shuffling, augmentation and dropout are
    seeded from ``(seed, epoch)`` and a checkpoint goes to ``state_path`` after it, so a restarted
    run continues where it stopped and ends with the same weights. Returns the per-epoch history
    ``[{"epoch", "size", "lr", "loss", "val_acc", "seconds"}]``.
    """
    pcfg = PretrainSettings.of(pcfg)
    sizes = [int(s) for s in pcfg.sizes]
    model.to(device)
    optimizer = make_optimizer(model, pcfg.optimizer, pcfg)
    loop = StepLoop("pretrain", int(pcfg.epochs), model, optimizer, seed, SEED_STRIDE, state_path, key,
                    on_step=on_epoch)
    done, history, _ = loop.resume()
    net = distributed.ddp(model, device)  # model itself in one process
    n, bs = len(train_set), int(pcfg.batch_size)
    object_pool = pcfg.pool == "object"

    def epoch(step: Step) -> dict:
        t0, e = time.perf_counter(), step.number
        size = sizes[e % len(sizes)]
        lr = lr_at(e, float(pcfg.lr), pcfg.lr_steps, float(pcfg.lr_gamma))
        g = torch.Generator().manual_seed(step.seed)  # shuffling and augmentation
        order = torch.randperm(n, generator=g).numpy()
        model.train()
        total, count = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"pretrain epoch {e + 1}/{pcfg.epochs} size {size}", unit="batch", leave=False)
        for s in bar:
            images, labels, windows = make_batch(train_set, order[s:s + bs], size, True, float(pcfg.scale_jitter), g,
                                                 bool(pcfg.channel_shuffle), return_windows=True)
            share = distributed.batch_share(len(labels))  # this rank's rows of the same batch (all in one process)
            logits = net(normalise(images[share].to(device)), windows[share].to(device) if object_pool else None)
            if distributed.active():  # averaged over the ranks, the gradients are the whole batch's
                scale = distributed.loss_scale(len(labels))
                loss = F.cross_entropy(logits, labels[share].to(device), reduction="sum") * scale
            else:
                loss = F.cross_entropy(logits, labels.to(device))
            optimizer_step(optimizer, loss, lr, "pretrain", f"epoch {e + 1}", f"pretrain.lr (now {pcfg.lr})")
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.3f}")
        entry = {"epoch": e, "size": size, "lr": lr, "loss": total / max(count, 1),
                 "val_acc": accuracy(model, normalise, val_set, sizes[0], device, object_pool=object_pool),
                 "seconds": time.perf_counter() - t0}
        log.info("pretrain epoch %d/%d: size %d, lr %.4g, loss %.4f, held-out accuracy %.3f (%.1f s)",
                 e + 1, pcfg.epochs, size, lr, entry["loss"], entry["val_acc"], entry["seconds"])
        return entry

    return loop.run(epoch, done, history)


def pretrain_data(rs: RunSettings) -> DataSettings:
    """``data`` with ``pretrain.train_split`` / ``pretrain.val_split`` in place of the data's
    splits when set: the backbone may pretrain on a split detection never trains on (the demo's
    ``pretrain`` split of extra synthetic images, standing in for ImageNet)."""
    pcfg = rs.pretrain
    return dataclasses.replace(rs.data, **{k: getattr(pcfg, k) for k in ("train_split", "val_split") if getattr(pcfg, k)})


def crop_sets(rs: RunSettings, store_side: int, rng: np.random.Generator) -> tuple[CropSet, CropSet]:
    """The training and held-out examples of ``pretrain.source`` (``voc_crops`` or ``image_folder``; crops kept
    at ``store_side``)."""
    pcfg = rs.pretrain
    if pcfg.source == "voc_crops":
        classes = list(rs.data.classes)
        data = pretrain_data(rs)
        train_records, val_records = train_val_split(data)
        use_difficult = data.use_difficult
        train_set = voc_crop_set(train_records, classes, pcfg, store_side, rng, use_difficult, "training crops")
        val_set = voc_crop_set(val_records, classes, pcfg, store_side, rng, use_difficult, "held-out crops")
        missing = [c for k, c in enumerate(classes, 1) if not (train_set.labels == k).any()]
        if missing:
            raise UserError(f"pretrain: no training object of class {', '.join(missing)} in "
                            f"{data.root} split {data.train_split}")
        return train_set, val_set
    if not pcfg.image_folder:
        raise UserError("pretrain.source=image_folder needs pretrain.image_folder=DIR (class-per-folder images)")
    return image_folder_sets(pcfg.image_folder, store_side)


def check_crop_settings(pcfg) -> list[int]:
    """Validate the crop phase's settings before any work; returns ``pretrain.sizes``."""
    sizes = [int(s) for s in pcfg.sizes]
    if pcfg.pool == "object" and pcfg.source != "voc_crops":
        raise UserError("pretrain.pool=object needs pretrain.source=voc_crops (object boxes)")
    if not sizes or min(sizes) < 16:
        raise UserError(f"pretrain.sizes={sizes}: give one or more input sizes of at least 16 px")
    return sizes


def run_crops(rs: RunSettings, artifact: Path, state_path: Path, key: str,
              on_epoch: Callable[[int, dict], None] | None = None) -> int:
    """``source=voc_crops`` or ``image_folder``: the multi-size crop classifier; writes ``artifact``."""
    pcfg = rs.pretrain
    sizes = check_crop_settings(pcfg)
    device = resolve_device(rs.device)
    torch.manual_seed(int(rs.seed))
    t0 = time.perf_counter()
    store_side = int(round(max(sizes) * 1.15))  # room for the scale jitter's random crops
    train_set, val_set = crop_sets(rs, store_side, np.random.default_rng(int(rs.seed)))
    counts = np.bincount(train_set.labels, minlength=len(train_set.class_names))
    log.info("pretrain: %d training and %d held-out examples; per class %s",
             len(train_set), len(val_set), dict(zip(train_set.class_names, counts.tolist())))
    if len(train_set) == 0:
        raise UserError(f"pretrain: no training examples (source={pcfg.source})")

    model, normalise = build_classifier(rs, len(train_set.class_names))
    history = train_classifier(model, normalise, train_set, val_set, pcfg, device, int(rs.seed),
                               state_path, key, on_epoch)
    record_history(rs, "pretrain_crops", [{"step": h["epoch"] + 1, "lr": h["lr"], "loss": h["loss"], "size": h["size"],
                                            "val_accuracy": h["val_acc"], "seconds": h["seconds"]} for h in history])
    object_pool = pcfg.pool == "object"
    final_acc = {int(s): accuracy(model, normalise, val_set, int(s), device, object_pool=object_pool) for s in sizes}
    meta = {**io.checkpoint_meta(rs.cfg), "sizes": sizes, "settings": key,
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
