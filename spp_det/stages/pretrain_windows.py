"""Pretraining, window phase (``pretrain.source=windows``; the second phase of ``crops+windows``).

Not the paper: it removes the crop/detection mismatch. The same layers plus a (K+1)-way classifier
train on windows pooled from conv5 of *whole* training images at their best scale, exactly as
detection pools proposals (``SPPNet.conv5_at`` and ``SPPNet.pool5_at``, with gradients; windows
drawn by ``spp_det.training.sampling.sample_scale_windows``). Started from the crop phase's
weights, crops teach the shapes cheaply and windows adapt the features to whole-image pooling.

One image per step, so it is not split over ranks under ``torchrun``: rank 0 trains while the
others wait for its artifact.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.data.voc import train_val_split
from spp_det.errors import UserError
from spp_det.features.scales import best_scale, scaled_sizes
from spp_det.model import build_model, init_from_scratch, new_fc8
from spp_det.model.weights import load_state, read_checkpoint
from spp_det.proposals import load_proposals, record_proposals
from spp_det.runtime import resolve_device
from spp_det.settings import ProposalsSettings, RunSettings
from spp_det.stages.curves import record_history
from spp_det.stages.pretrain_crops import SEED_STRIDE, pretrain_data
from spp_det.training.loop import Step, StepLoop, lr_at, make_optimizer, optimizer_step
from spp_det.training.sampling import sample_scale_windows

log = logging.getLogger(__name__)


class WindowTrainer:
    """Backbone + pyramid + fc6/fc7 + a (K+1)-way classifier trained on windows pooled from conv5
    of whole images at one of ``model.scales``, exactly as detection pools them (``SPPNet.conv5_at``
    and ``SPPNet.pool5_at``, with gradients)."""

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
        return scaled_sizes(rec.height, rec.width, self.model.scales, self.model.max_size)

    def scale_of(self, rec) -> Callable[[np.ndarray], np.ndarray]:
        sizes = self.scale_sizes(rec)
        return lambda boxes: best_scale(torch.from_numpy(boxes), sizes, self.model.geometry.best_scale_area).numpy()

    def sample(self, rec, pcfg, rng: np.random.Generator, use_difficult: bool,
               proposals: dict[str, np.ndarray] | None) -> tuple[int, np.ndarray, np.ndarray]:
        """``sample_scale_windows`` of ``rec`` with ``pcfg``'s settings at this model's scales;
        ``proposals`` (``{image_id: float32 [P, 4]}``, unflipped, or None) add their windows."""
        return sample_scale_windows(rec, self.scale_of(rec), int(pcfg.windows_per_image), float(pcfg.fg_fraction),
                                    float(pcfg.fg_iou), rng, use_difficult,
                                    None if proposals is None else record_proposals(rec, proposals))

    def logits(self, image: np.ndarray, rec, s: int, boxes: np.ndarray) -> torch.Tensor:
        """``image`` uint8 ``[H, W, 3]`` at scale index ``s`` -> logits ``Tensor[K, classes]`` of
        ``boxes`` ``[K, 4]`` (image pixels), all pooled on that scale's conv5 map."""
        size = self.scale_sizes(rec)[s]
        fmap = self.model.conv5_at(image, size)
        pool5 = self.model.pool5_at(fmap, torch.from_numpy(boxes).to(fmap.device), size)
        return self.classifier(self.model.head(pool5))


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
                  state_path: Path | None = None, key: str = "", use_difficult: bool = False,
                  on_epoch: Callable[[int, dict], None] | None = None,
                  proposals: dict[str, np.ndarray] | None = None) -> list[dict]:
    """``pcfg.iterations`` iterations, each on one training image (mirrored with probability 1/2) at
    the best scale of one of its objects, ``windows_per_image`` windows, cross-entropy,
    ``pcfg.optimizer``; lr times ``lr_gamma`` at each of ``pcfg.iteration_lr_steps``. A step of
    ``spp_det.training.loop`` is a block of ``pcfg.log_every`` iterations: its sampling is seeded
    from ``(seed, block)``, a history entry ``{"epoch", "iteration", "lr", "loss", "val_acc",
    "seconds"}`` (mean training loss of the block; held-out accuracy after the last) is logged and
    a resumable checkpoint goes to ``state_path``, so a restarted run ends with the same weights."""
    params = nn.ModuleList([trainer.model, trainer.classifier])
    optimizer = make_optimizer(params, pcfg.optimizer, pcfg)
    iterations, every = int(pcfg.iterations), max(1, int(pcfg.log_every))
    blocks = -(-iterations // every)
    loop = StepLoop("pretrain", blocks, params, optimizer, seed, SEED_STRIDE, state_path, key, on_step=on_epoch)
    done, history, _ = loop.resume()
    trainer.train()

    def block(step: Step) -> dict:
        t0, b, rng = time.perf_counter(), step.number, step.rng
        total, count = 0.0, 0
        bar = tqdm(range(b * every, min(iterations, (b + 1) * every)), desc=f"pretrain windows {b + 1}/{blocks}",
                   unit="it", leave=False)
        for it in bar:
            lr = lr_at(it, float(pcfg.lr), pcfg.iteration_lr_steps, float(pcfg.lr_gamma))
            rec = train_records[int(rng.integers(len(train_records)))]
            if rng.random() < 0.5:
                rec = rec.flip()
            s, boxes, labels = trainer.sample(rec, pcfg, rng, use_difficult, proposals)
            if len(boxes) == 0:
                continue
            logits = trainer.logits(rec.load_image(), rec, s, boxes)
            loss = F.cross_entropy(logits, torch.from_numpy(labels).to(logits.device))
            optimizer_step(optimizer, loss, lr, "pretrain", f"iteration {it + 1}", f"pretrain.lr (now {pcfg.lr})")
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        # held-out accuracy after the last block only
        val_acc = window_accuracy(trainer, val_records, pcfg, seed, use_difficult, proposals) if b == blocks - 1 \
            else None
        entry = {"epoch": b, "iteration": min(iterations, (b + 1) * every), "lr": lr, "loss": total / max(count, 1),
                 "val_acc": val_acc, "seconds": time.perf_counter() - t0}
        log.info("pretrain windows: iteration %d/%d, lr %.4g, loss %.4f, held-out window accuracy %s (%.1f s)",
                 entry["iteration"], iterations, lr, entry["loss"],
                 "-" if entry["val_acc"] is None else f"{entry['val_acc']:.3f}", entry["seconds"])
        return entry

    return loop.run(block, done, history)


def start_from(path: Path, model, classifier: nn.Linear) -> None:
    """Initialise backbone, fc6/fc7 and (when its shape fits) the classifier from an earlier
    ``pretrain.pt`` (e.g. crop pretraining), so window training refines features instead of
    learning them from nothing."""
    if not path.is_file():
        raise UserError(f"pretrain.start_from={path}: file not found")
    state = read_checkpoint(path, ("backbone", "head"), "a pretrain.pt (no backbone/head weights; pretrain.start_from)")
    load_state(model.backbone, state["backbone"], path, "pretrain.start_from: backbone weights do not fit the model group")
    load_state(model.head, state["head"], path, "pretrain.start_from: fc6/fc7 weights do not fit the model group")
    if state.get("classifier", {}).get("weight", torch.empty(0)).shape == classifier.weight.shape:
        load_state(classifier, state["classifier"], path, "pretrain.start_from: classifier does not fit")
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


def window_proposals(rs: RunSettings) -> ProposalsSettings | None:
    """``proposals`` with ``pretrain.window_proposals``' overrides (checked as the group is): how window
    training's background boxes are computed; None when it is unset."""
    over = rs.pretrain.window_proposals
    return ProposalsSettings.from_cfg({**vars(rs.proposals), **over}) if over else None


def window_trainer(rs: RunSettings, num_classes: int, start: Path | None) -> WindowTrainer:
    """The network and its classifier on the device: from ``pretrain.start_from`` or ``start`` (a
    crop-pretrained ``pretrain.pt``) when given, else from scratch; ``pretrain.frozen_convs`` fixed."""
    pcfg = rs.pretrain
    model = build_model(rs.model, pretrained=False).to(resolve_device(rs.device))
    classifier = new_fc8(model.head.out_dim, num_classes)
    if pcfg.start_from or start is not None:
        start_from(Path(pcfg.start_from or start), model, classifier)
    elif pcfg.init == "kaiming":
        init_from_scratch(model.backbone)
    classifier.to(model.device)
    frozen = freeze_leading_convs(model.backbone, int(pcfg.frozen_convs))
    if frozen:
        log.info("pretrain: the first %d conv layers (%d parameters) stay fixed, in eval mode", int(pcfg.frozen_convs),
                 sum(p.numel() for m in frozen for p in m.parameters()))
    return WindowTrainer(model, classifier, frozen)


def run_windows(rs: RunSettings, artifact: Path, state_path: Path, key: str,
                on_epoch: Callable[[int, dict], None] | None = None, start: Path | None = None) -> int:
    """``source=windows``: train on windows of whole training images and write ``artifact``,
    starting from ``pretrain.start_from`` or ``start`` (a crop-pretrained ``pretrain.pt``) when given."""
    pcfg = rs.pretrain
    if int(pcfg.iterations) < 1 or not 0 < float(pcfg.fg_fraction) <= 1 or int(pcfg.windows_per_image) < 1:
        raise UserError(f"pretrain: source=windows needs iterations >= 1, windows_per_image >= 1 and 0 < fg_fraction "
                        f"<= 1 (got {pcfg.iterations}, {pcfg.windows_per_image}, {pcfg.fg_fraction})")
    t0 = time.perf_counter()
    classes = list(rs.data.classes)
    data = pretrain_data(rs)
    train_records, val_records = train_val_split(data)
    if not train_records:
        raise UserError(f"pretrain: no training images in {data.root} split {data.train_split}")
    if not distributed.is_main():  # window training is not split over ranks: wait for rank 0's artifact
        distributed.barrier()
        return 0
    trainer = window_trainer(rs, len(classes) + 1, start)
    model, classifier = trainer.model, trainer.classifier
    log.info("pretrain: windows of %d training images (%d held out), %d iterations of %d windows at scales %s",
             len(train_records), len(val_records), int(pcfg.iterations), int(pcfg.windows_per_image),
             list(model.scales))
    proposals, proposals_settings = None, window_proposals(rs)
    if proposals_settings is not None:  # selective search, cached like detection's
        log.info("pretrain: proposals of the pretraining images with %s",
                 pcfg.window_proposals)
        proposals = load_proposals(train_records + val_records, proposals_settings, rs.cache_dir,
                                   workers=int(rs.num_workers), progress=True)
    history = train_windows(trainer, train_records, val_records, pcfg, int(rs.seed), state_path, key,
                            rs.data.use_difficult, on_epoch, proposals)
    record_history(rs, "pretrain_windows", [{"step": h["iteration"], "lr": h["lr"], "loss": h["loss"],
                                              "val_accuracy": h["val_acc"], "seconds": h["seconds"]} for h in history])
    meta = {**io.checkpoint_meta(rs.cfg), "sizes": list(model.scales), "settings": key,
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
