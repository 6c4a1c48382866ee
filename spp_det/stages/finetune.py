"""``spp-det finetune``: fc6, fc7 and a new (K+1)-way fc8 on pooled pyramid vectors (Sec. 4.1).

The conv layers stay fixed, so a window's pool5 vector (projection of the window onto the cached
conv5 map of its best scale, then spatial pyramid pooling) never changes during fine-tuning.
Like the original release (which fine-tuned on cached pool5 features), this stage pools once:

1. **windows** per training image (and its mirror when ``data.flip``): the ground-truth boxes
   themselves plus the selective-search proposals, labelled by their best IoU with the ground
   truth (``sampling.label_windows``); all foreground windows (IoU >= 0.5) are kept and at most
   ``max_bg_per_image`` background ones (IoU in [0.1, 0.5)), so the pool's size is bounded;
2. **pool5** of those windows from the cached conv5 maps (``FeatureCache``), stored fp16 in
   memory, or in an on-disk cache keyed by everything that produced it when it is larger than
   ``pool_in_memory_mb``;
3. **iterations**: mini-batches of ``batch_size`` (128) windows drawn from the whole pool with
   ``fg_fraction`` (25%) foreground, softmax loss over K+1 classes, dropout on, SGD with momentum
   and weight decay, and the step learning-rate schedule.

Every ``val_every`` iterations the validation split (``train_val_split``; never the test split)
is scored and the snapshot with the lowest validation loss is kept: that one is written.
Every ``checkpoint_every`` iterations the state (weights, optimizer, iteration, best snapshot,
history) goes to ``work_dir/finetune_state.pt``. Iteration ``i`` draws its windows and its
dropout masks from generators seeded with ``(seed, i)``, so a resumed run repeats exactly what
an uninterrupted one would have done: the final weights are identical.

Under ``torchrun`` the fc layers train with DistributedDataParallel: every rank draws the same
mini-batch of ``batch_size`` windows and takes every ``world_size``-th of them, and the loss is
scaled so that the averaged gradient is the whole batch's (``spp_det.distributed.batch_share``):
the effective batch, the iterations and the lr schedule are the configured ones whatever the number
of processes; only the dropout masks (seeded per rank) and the summation order differ from one
process. Each rank pools the windows itself from the shared conv5 cache (an on-disk pool is written
by rank 0 and read by the others) and scores the validation windows itself; rank 0 writes the
checkpoints and the artifact, and a restarted run resumes from them on every rank.

Writes ``work_dir/finetune.pt`` = ``{"state_dict": SPPNet state_dict (fine-tuned head),
"fc8": {"weight", "bias"}, "meta": checkpoint_meta(cfg) + settings, "val": {...}}`` atomically.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from spp_det import distributed, io
from spp_det.artifact import FINETUNE, FINETUNE_POOL5_CACHE, FINETUNE_STATE, cache_folder
from spp_det.boxes import flip_boxes
from spp_det.data.voc import train_val_split
from spp_det.errors import UserError
from spp_det.features.cache import FeatureCache
from spp_det.model import FCClassifier, new_fc8
from spp_det.proposals import load_proposals
from spp_det.runtime import resolve_device
from spp_det.settings import RunSettings
from spp_det.stages import declare, stage
from spp_det.stages.curves import record_history
from spp_det.stages.start import backbone_source, build_finetune_model, describe_backbone, require_trained_backbone
from spp_det.training.loop import Step, StepLoop, lr_at, make_optimizer, optimizer_step
from spp_det.training.sampling import sample_minibatch, subsample
from spp_det.training.windows import finetune_windows

log = logging.getLogger(__name__)

ARTIFACT, STATE = FINETUNE, FINETUNE_STATE


# --------------------------------------------------------------------------------------------
# Windows and their pool5 vectors
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WindowPool:
    """Pooled windows of a split.

    ``pool5`` ``float16 [N, D]`` (numpy array, or ``RowFile`` on disk); ``labels`` ``int64 [N]`` (0 = background);
    ``fg``, ``bg`` ``int64`` indices into it; ``images`` how many image records it came from.
    """

    pool5: np.ndarray
    labels: np.ndarray
    fg: np.ndarray
    bg: np.ndarray
    images: int = 0

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[B, D]`` and ``int64 [B]`` for ``indices`` (gathered in sorted order: disk-friendly)."""
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices), self.pool5.shape[1]), np.float16)
        rows[order] = self.pool5[np.asarray(indices)[order]]
        return torch.from_numpy(rows).float(), torch.from_numpy(self.labels[indices])


class RowFile:
    """The rows of a 2-d ``.npy`` file, read with ``os.pread`` when asked for: ``rows[indices]`` ->
    ``[len(indices), D]``. Not a memory map: the rows that mini-batches read over thousands of
    iterations would all stay mapped into this process (its resident memory grew with the pool:
    8.5 GB for 754 VOC images' 4.8 GB pool); with reads only the batch is held, and the OS page cache
    keeps what fits."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran_order, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order or len(self.shape) != 2:
            raise UserError(f"{path}: not a 2-d C-ordered array (delete it: it is a cache)")
        self.row_bytes = int(self.shape[1]) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if hasattr(self, "fd"):
            os.close(self.fd)

    def __getitem__(self, indices) -> np.ndarray:
        rows = np.asarray(indices, np.int64).reshape(-1)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for j, r in enumerate(rows):
            out[j] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + int(r) * self.row_bytes), self.dtype)
        return out


def build_pool(model, feature_cache, records, proposals: dict, fcfg, use_difficult: bool, seed: int,
               device: torch.device, store_dir: Path | None, key: str, desc: str) -> WindowPool:
    """Label every record's windows, then pool5 them from the cached conv5 maps (see the module
    docstring). Flipped records use the mirrored proposals of their image."""
    windows, labels, n_fgs = [], [], []
    for i, rec in enumerate(records):
        boxes = proposals[rec.image_id]
        if rec.flipped:
            boxes = flip_boxes(boxes, rec.width)
        rng = np.random.default_rng([seed, i, int(rec.flipped)])
        w, lab, n_fg = finetune_windows(rec, boxes, fcfg, use_difficult, rng)
        windows.append(w)
        labels.append(lab)
        n_fgs.append(n_fg)
    n = sum(len(w) for w in windows)
    dim = int(model.pool5_dim)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    offsets = np.cumsum([0] + [len(w) for w in windows])
    is_fg = np.concatenate([np.arange(len(w)) < k for w, k in zip(windows, n_fgs)]) if windows else np.zeros(0, bool)
    fg, bg = np.flatnonzero(is_fg), np.flatnonzero(~is_fg)
    mb = n * dim * 2 / 2**20
    log.info("finetune: %s: %d images, %d windows (%d foreground, %d background), pool5 %d-d: %.0f MiB fp16",
             desc, len(records), n, len(fg), len(bg), dim, mb)

    on_disk = store_dir is not None and mb > float(fcfg.pool_in_memory_mb)
    path = store_dir / f"{key}.npy" if on_disk else None
    with distributed.main_first(path is not None):  # under torchrun rank 0 writes the on-disk pool, the others read it
        if path is not None and path.is_file():
            pool5 = RowFile(path)
            if pool5.shape == (n, dim):
                log.info("finetune: %s: pool5 from %s", desc, path)
                return WindowPool(pool5, all_labels, fg, bg, len(records))
        ctx = io.atomic_path(path) if path is not None else contextlib.nullcontext(None)
        with ctx as tmp, (open(tmp, "wb") if tmp is not None else contextlib.nullcontext()) as out:
            if out is not None:  # written image by image: only one image's vectors in memory at a time
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                          "shape": (n, dim)}
                np.lib.format.write_array_header_1_0(out, header)
            else:
                pool5 = np.empty((n, dim), np.float16)
            with torch.no_grad():
                for i, rec in enumerate(tqdm(records, desc=f"finetune: pool5 ({desc})", unit="image")):
                    if not len(windows[i]):
                        continue
                    maps = [m.to(device=device, dtype=torch.float32) for m in feature_cache.conv5(rec)]
                    vectors = model.pool5(maps, image_hw=(rec.height, rec.width),
                                          windows=torch.from_numpy(windows[i]).to(device))
                    vectors = vectors.to("cpu", torch.float16).numpy()
                    if out is not None:
                        out.write(vectors.tobytes())
                    else:
                        pool5[offsets[i]:offsets[i + 1]] = vectors
        if path is not None:
            pool5 = RowFile(path)
        return WindowPool(pool5, all_labels, fg, bg, len(records))


def validation_set(pool: WindowPool, fg_fraction: float, seed: int) -> np.ndarray:
    """A fixed set of validation windows with the training batches' foreground fraction: every
    foreground window and enough background ones (a seeded sample) to make the ratio."""
    if not len(pool.fg):
        return np.asarray(pool.bg, np.int64)
    n_bg = min(len(pool.bg), int(round(len(pool.fg) * (1 - fg_fraction) / max(fg_fraction, 1e-6))))
    bg = subsample(pool.bg, n_bg, np.random.default_rng([seed, 7919]))
    return np.concatenate([pool.fg, bg]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# The fc layers and the training loop
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(net: FCClassifier, pool: WindowPool, indices: np.ndarray, device, batch_size: int = 1024) -> dict:
    """Mean softmax loss and accuracy of ``net`` (eval mode: no dropout) on ``pool[indices]``."""
    was_training = net.training
    net.eval()
    loss, correct = 0.0, 0
    for s in range(0, len(indices), batch_size):
        x, y = pool.batch(indices[s:s + batch_size])
        logits = net(x.to(device))
        loss += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
        correct += int((logits.argmax(1).cpu() == y).sum())
    net.train(was_training)
    n = max(len(indices), 1)
    return {"loss": loss / n if len(indices) else float("nan"), "accuracy": correct / n if len(indices) else float("nan")}


def _clone_state(module: nn.Module) -> dict:
    return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}


@dataclasses.dataclass
class Validation:
    """Scores ``net`` on the validation windows ``pool[indices]`` (``evaluate_fn``) and keeps the
    snapshot with the lowest loss in ``best``; ``running`` is the smoothed training loss for the log.
    ``state()`` is what a resumed run needs of it; ``seconds`` (when given) gets the wall-clock
    seconds from one validation to the next."""

    net: FCClassifier
    pool: WindowPool | None
    indices: np.ndarray
    device: torch.device
    evaluate_fn: Callable[..., dict]
    seconds: list[float] | None
    best: dict = dataclasses.field(default_factory=lambda: {"iteration": 0, "loss": float("inf"),
                                                            "accuracy": float("nan"), "state": None})
    running: float = 0.0
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def state(self) -> dict:
        return {"best": self.best, "running": self.running}

    def __call__(self, it: int, lr: float) -> dict:
        """The history entry of iteration ``it``."""
        entry = {"iteration": it, **self.evaluate_fn(self.net, self.pool, self.indices, self.device),
                 "train_loss": self.running, "lr": lr}
        if self.seconds is not None:
            self.seconds.append(time.perf_counter() - self.since)
        self.since = time.perf_counter()
        improved = entry["loss"] < self.best["loss"]
        if improved:
            self.best = {"iteration": it, "loss": entry["loss"], "accuracy": entry["accuracy"],
                         "state": _clone_state(self.net)}
        log.info("finetune: iteration %d: train loss %.4f, validation loss %.4f, accuracy %.3f%s",
                 it, self.running, entry["loss"], entry["accuracy"], " (best so far)" if improved else "")
        return entry


def train_fc(
    net: FCClassifier,
    train_pool: WindowPool,
    val_pool: WindowPool | None,
    fcfg,
    seed: int,
    device: torch.device,
    state_path: Path | None = None,
    key: str = "",
    on_iteration: Callable[[int, FCClassifier], None] | None = None,
    evaluate_fn: Callable[..., dict] = evaluate,
    seconds: list[float] | None = None,
) -> dict:
    """Fine-tune ``net`` on ``train_pool`` for ``fcfg.iterations`` mini-batches; returns
    ``{"best_iteration", "best_loss", "best_accuracy", "history": [{"iteration", "loss",
    "accuracy", "train_loss", "lr"}]}`` and leaves the best snapshot's weights in ``net``.

    ``seconds``: see ``Validation`` (this run's entries only: a resumed run's earlier ones were
    timed by the killed run). ``on_iteration(i, net)`` runs after iteration ``i`` (1-based) and its
    checkpoint; tests raise from it to simulate a killed run. Resumes from ``state_path``
    (``spp_det.training.loop``) when it holds a checkpoint with the same settings ``key``.
    """
    if not len(train_pool.fg) and not len(train_pool.bg):
        raise UserError("finetune: no training windows (no ground-truth boxes and no proposals in the training split)")
    if not len(train_pool.fg):
        raise UserError("finetune: no foreground windows in the training split (no ground-truth boxes?)")
    iterations, batch_size = int(fcfg.iterations), int(fcfg.batch_size)
    net.to(device).train()
    optimizer = make_optimizer(net, "sgd", fcfg, "finetune")  # SGD with momentum and weight decay (paper)
    val_idx = validation_set(val_pool, float(fcfg.fg_fraction), seed) if val_pool is not None else np.zeros(0, np.int64)
    validate = Validation(net, val_pool, val_idx, device, evaluate_fn, seconds)
    # seed stride 1_000_003: the one fine-tuning always used (same batches and masks as before the shared loop)
    loop = StepLoop("finetune", iterations, net, optimizer, seed, 1_000_003, state_path, key,
                    int(fcfg.checkpoint_every), final_checkpoint=False, first=1, extra=validate.state,
                    on_step=None if on_iteration is None else lambda it, _: on_iteration(it, net))
    done, history, extra = loop.resume()
    validate.best, validate.running = extra.get("best", validate.best), extra.get("running", 0.0)
    model = distributed.ddp(net, device)  # net itself in one process
    share, scale = distributed.batch_share(batch_size), distributed.loss_scale(batch_size)
    bar = tqdm(desc="finetune", unit="batch", initial=done, total=iterations)

    def step(s: Step) -> dict | None:
        it = s.number
        lr = lr_at(it - 1, float(fcfg.lr), [int(v) for v in fcfg.lr_steps], float(fcfg.lr_gamma))
        idx, _ = sample_minibatch(train_pool.fg, train_pool.bg, batch_size, float(fcfg.fg_fraction), s.rng)
        x, y = train_pool.batch(idx)
        if distributed.active():  # this rank's rows of the same batch; averaged gradients = the whole batch's
            loss = F.cross_entropy(model(x[share].to(device)), y[share].to(device), reduction="sum") * scale
        else:
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
        optimizer_step(optimizer, loss, lr, "finetune", f"iteration {it}", f"finetune.lr (now {fcfg.lr})")
        validate.running = loss.item() if it == 1 else 0.98 * validate.running + 0.02 * loss.item()
        bar.update()
        if it % 50 == 0:
            bar.set_postfix(loss=f"{validate.running:.3f}", lr=f"{lr:.2g}")
        return validate(it, lr) if (it % int(fcfg.val_every) == 0 or it == iterations) and len(val_idx) else None

    history = loop.run(step, done, history)
    bar.close()
    return keep_best(net, validate.best, iterations, history)


def keep_best(net: FCClassifier, best: dict, iterations: int, history: list[dict]) -> dict:
    """Load the snapshot with the lowest validation loss into ``net`` (the last weights when nothing
    was validated) and return ``train_fc``'s result."""
    if best["state"] is None:
        log.warning("finetune: no validation windows (empty validation split?): keeping the last iteration's "
                    "weights, not a snapshot chosen on validation")
        best = {"iteration": iterations, "loss": float("nan"), "accuracy": float("nan"), "state": None}
    else:
        net.load_state_dict(best["state"])
    log.info("finetune: chosen snapshot: iteration %d (validation loss %.4f, accuracy %.3f)",
             best["iteration"], best["loss"], best["accuracy"])
    return {"best_iteration": best["iteration"], "best_loss": best["loss"], "best_accuracy": best["accuracy"],
            "history": history}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


(KEY,) = stage("finetune").keys


def settings_key(rs: RunSettings, source: Path | None) -> str:
    """Fine-tuning's settings key (``spp_det.stages.declare``); ``source``: the backbone file or None."""
    return declare.settings_key(rs.cfg, KEY, {"backbone": source, "proposals": declare.proposals_cache(rs.proposals)})


def split_pools(rs: RunSettings, model, key: str, device: torch.device) -> tuple[WindowPool, WindowPool]:
    """The pooled windows of the training split (with its mirrors when ``data.flip``) and of the
    validation split, from the conv5 cache the features stage fills (``build_pool``)."""
    data = rs.data
    train, val = train_val_split(data)
    proposals = load_proposals(train + val, rs.proposals, rs.cache_dir,  # shared with the proposals stage
                               workers=int(rs.num_workers), progress=True)
    if data.flip:  # horizontal flips (paper: yes); their conv5 comes from the mirrored image
        train = train + [r.flip() for r in train]
    cache = FeatureCache(rs.cache_dir, model, rs.conv5_cache)
    use_difficult, seed, fcfg = data.use_difficult, int(rs.seed), rs.finetune
    store = cache_folder(rs.cache_dir, FINETUNE_POOL5_CACHE)
    return (build_pool(model, cache, train, proposals, fcfg, use_difficult, seed, device, store,
                       io.hash_settings([key, "train"]), "training"),
            build_pool(model, cache, val, proposals, fcfg, use_difficult, seed, device, store,
                       io.hash_settings([key, "val"]), "validation"))


def run(cfg, on_iteration: Callable[[int, FCClassifier], None] | None = None) -> int:
    """Fine-tune fc6, fc7 and fc8 (see the module docstring); writes ``work_dir/finetune.pt``."""
    rs = RunSettings.of(cfg)
    fcfg = rs.finetune
    work_dir = Path(rs.work_dir)
    artifact, state_path = work_dir / ARTIFACT, work_dir / STATE
    source = backbone_source(rs)
    key = settings_key(rs, source)
    if io.artifact_is_current(artifact, key):
        return declare.current("finetune", artifact)
    t0 = time.perf_counter()
    device = resolve_device(rs.device)
    seed = int(rs.seed)
    torch.manual_seed(seed)
    require_trained_backbone(rs)
    if source is not None:
        log.info("finetune: backbone from %s", source)
    elif rs.model.weights:
        log.info("finetune: backbone from model.weights=%s", rs.model.weights)
    else:
        log.warning("finetune: allow_random_backbone=true: the conv layers keep their random initialisation")
    model = build_finetune_model(rs, source).to(device)
    model.eval()

    train_pool, val_pool = split_pools(rs, model, key, device)
    num_classes = len(rs.data.classes) + 1
    net = FCClassifier(copy.deepcopy(model.head), new_fc8(model.head.out_dim, num_classes, float(fcfg.fc8_std)))
    seconds: list[float] = []
    val_result = train_fc(net, train_pool, val_pool, fcfg, seed, device, state_path, key, on_iteration,
                          seconds=seconds)
    history = val_result["history"]
    seconds = [None] * (len(history) - len(seconds)) + seconds  # entries from before a resume: not timed here
    record_history(rs, "finetune", [
        {"step": h["iteration"], "lr": h["lr"], "loss": h["train_loss"], "val_loss": h["loss"],
         "val_accuracy": h["accuracy"], "seconds": t} for h, t in zip(history, seconds)])

    if distributed.is_main():  # one writer; the others wait below until the artifact is there
        model.head.load_state_dict(net.head.state_dict())
        meta = {**io.checkpoint_meta(cfg), "settings": key, "backbone_source": describe_backbone(rs, source)}
        io.save_torch({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                       "fc8": {k: v.cpu() for k, v in net.fc8.state_dict().items()},
                       "meta": meta, "val": val_result}, artifact)
        state_path.unlink(missing_ok=True)
        log.info("finetune: wrote %s in %.1f s (snapshot of iteration %d, validation accuracy %.3f)", artifact,
                 time.perf_counter() - t0, val_result["best_iteration"], val_result["best_accuracy"])
    distributed.barrier()
    return 0
