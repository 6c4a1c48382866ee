"""Classification examples for pretraining (paper, Sec. 3.1: the backbone as an image classifier).

* ``voc_crop_set``: every (non-difficult) object of a VOC-layout split cut out with some context,
  plus background crops of the same images (``crop_boxes``), cut once and kept in memory;
* ``image_folder_sets``: a class-per-folder image set (ImageNet layout) read lazily;
* ``make_batch``: a mini-batch at one input size with the training augmentation (random crop of
  ``scale_jitter``..1 of the area, horizontal flip, optional channel shuffle).

Images are uint8 ``Tensor[3, h, w]`` here; the stage normalises them for its backbone.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from spp_det.boxes import box_iou, clip_boxes
from spp_det.data.images import read_image
from spp_det.errors import UserError
from spp_det.training.sampling import trained_objects


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
        keep = trained_objects(rec, use_difficult)
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
