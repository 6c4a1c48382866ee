"""Cache of conv5 maps per image (and flip) and scale, fp16 on disk.

Key: SHA-1 of the image file's bytes, the flip, a hash of the backbone's weights (every tensor of
its state_dict) and of every setting that changes the maps (backbone, width, normalisation,
scales, max_size). So a retrained backbone, other scales or an edited image never read a stale
entry. One file per image: ``{"conv5": [Tensor[1, C, h_s, w_s] fp16, ...], "image_hw": [H, W]}``,
written atomically (``spp_det.io.save_torch``) and read with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

from spp_det.artifact import CONV5_CACHE, cache_folder
from spp_det.io import hash_file, hash_settings, load_torch, save_torch

log = logging.getLogger(__name__)


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-1 over the names, shapes, dtypes and bytes of every tensor in ``module.state_dict()``."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d buffers (BN)
    return h.hexdigest()[:16]


class FeatureCache:
    """``conv5(record)`` -> ``list[Tensor[1, C, h_s, w_s]]`` fp16 on the CPU, one per scale of ``model``.

    Misses run ``model.conv5`` (eval mode, no gradients) and store the result; with ``store=False``
    (``conv5_cache: false``) nothing is read or written: every call computes the maps, for datasets
    whose conv5 would not fit on disk (docs/voc2007.md). ``stats`` counts
    hits, misses and bytes; ``bytes_per_image()`` is the mean size of the entries seen.
    """

    def __init__(self, cache_dir: str | Path, model, store: bool = True):
        self.model = model
        bb = model.backbone
        self.settings = {
            "backbone": type(bb).__name__,
            "out_channels": int(bb.out_channels),
            "normalisation": [bb.pixel_mean.flatten().tolist(), bb.pixel_std.flatten().tolist()],
            "scales": list(model.scales),
            "max_size": model.max_size,
            "weights": weights_hash(bb),
            "layout": "channels_last",  # Backbone.body_input's memory layout: maps differ from NCHW's by rounding
        }
        if getattr(bb, "arch_key", None):  # timm: settings such as the padding type change conv5, not the weights
            self.settings["arch"] = bb.arch_key
        self.root = cache_folder(cache_dir, CONV5_CACHE) / hash_settings(self.settings)
        self.store = bool(store)
        self.stats = {"hits": 0, "misses": 0, "bytes": 0, "entries": 0}
        self._file_hash: dict[tuple[str, int, int], str] = {}

    def key(self, record) -> str:
        """Content key of a record: file bytes hash (+ ``_flip``)."""
        path = Path(record.path)
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._file_hash:
            self._file_hash[memo] = hash_file(path)
        return self._file_hash[memo] + ("_flip" if getattr(record, "flipped", False) else "")

    def path(self, record) -> Path:
        key = self.key(record)
        return self.root / key[:2] / f"{key}.pt"

    def contains(self, record) -> bool:
        return self.path(record).is_file()

    def conv5(self, record) -> list[Tensor]:
        """The record's conv5 maps (fp16, CPU), computed and stored on a miss."""
        path = self.path(record) if self.store else None
        if path is not None and path.is_file():
            try:
                entry = load_torch(path)
                maps = entry["conv5"]
                self._count(path, hit=True)
                return maps
            except Exception as exc:  # a damaged entry is recomputed, loudly
                log.warning("%s: unreadable conv5 cache entry (%s); recomputing", path, exc)
        image = record.load_image()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                full = self.model.conv5(image)
                half = {id(m): m.detach().to("cpu", torch.float16).contiguous() for m in full}
                maps = [half[id(m)] for m in full]  # a map shared by capped scales is saved once
        finally:
            self.model.train(was_training)
        if path is None:
            self.stats["misses"] += 1
            return maps
        save_torch({"conv5": maps, "image_hw": [int(image.shape[0]), int(image.shape[1])]}, path)
        self._count(path, hit=False)
        return maps

    def _count(self, path: Path, hit: bool) -> None:
        self.stats["hits" if hit else "misses"] += 1
        self.stats["bytes"] += path.stat().st_size
        self.stats["entries"] += 1

    def bytes_per_image(self) -> float:
        """Mean bytes of the entries read or written so far (0 when none)."""
        return self.stats["bytes"] / self.stats["entries"] if self.stats["entries"] else 0.0
