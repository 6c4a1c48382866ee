"""``spp-det features``: fill the conv5 cache for the training split (and its flips when
``data.flip``) and the validation split, so finetune, svm and bboxreg only read it. Not the test
split: eval and detect compute conv5 of the images they see (and time it per image), so test
maps in the cache would only take disk and time. Under ``torchrun`` each rank computes its share of
the images (``spp_det.distributed.shard``) into the same content-keyed cache, and every rank waits
for the others before returning, so the next stage finds the cache complete."""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from spp_det import distributed
from spp_det.data.voc import load_split
from spp_det.features.cache import FeatureCache
from spp_det.runtime import resolve_device
from spp_det.settings import RunSettings
from spp_det.stages.start import backbone_source, build_finetune_model

log = logging.getLogger(__name__)

def split_records(rs: RunSettings) -> list:
    """Unique records of the train split (+ flips) and the val split, in that order of the run's settings ``rs``."""
    data = rs.data
    splits = [data.train_split, data.val_split]
    records, seen = [], set()
    for i, split in enumerate(s for s in splits if s):
        for r in load_split(data, split):
            for rec in ([r, r.flip()] if i == 0 and data.flip else [r]):
                if (rec.path, rec.flipped) not in seen:
                    seen.add((rec.path, rec.flipped))
                    records.append(rec)
    return records


def run(cfg) -> int | None:
    rs = RunSettings.of(cfg)
    if not rs.conv5_cache:  # finetune, svm and bboxreg compute conv5 when they need it
        log.info("conv5_cache=false: no conv5 cache to fill")
        return None
    torch.manual_seed(int(rs.seed))
    # the backbone finetune will use (model.backbone_checkpoint, else work_dir/pretrain.pt), so the
    # cache it fills is the one finetune, svm and bboxreg read
    model = build_finetune_model(rs, backbone_source(rs)).to(resolve_device(rs.device)).eval()
    cache = FeatureCache(rs.cache_dir, model)
    records = distributed.shard(split_records(rs))
    for record in tqdm(records, desc="conv5 features", unit="image"):
        cache.conv5(record)
    counts = distributed.all_gather((len(records), cache.stats["misses"], cache.stats["hits"], cache.stats["bytes"]))
    n, misses, hits, size = (sum(c[i] for c in counts) for i in range(4))
    log.info("conv5 cache %s: %d images (%d computed, %d already cached), %.1f KiB per image%s",
             cache.root, n, misses, hits, size / max(n, 1) / 1024,
             f" ({len(counts)} processes)" if len(counts) > 1 else "")
    return None
