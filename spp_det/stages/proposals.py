"""``spp-det proposals``: fill the proposals cache for the dataset's splits (or export them).

``proposals.split=NAME`` picks one split; by default ``data.train_split``, ``data.val_split``
(when set) and ``data.test_split``. ``proposals.export=FILE.npz`` also writes the chosen
split's boxes in the project schema (``spp_det.proposals.precomputed``). Unreadable images are
listed together at the end and the stage fails (exit 1); every good image stays cached. Under
``torchrun`` each rank computes its share of the images (``spp_det.distributed.shard``) into the
same content-keyed cache; rank 0 reports the unreadable files of all and writes the export.
"""
from __future__ import annotations

import logging

from spp_det import distributed
from spp_det.data.voc import load_split
from spp_det.proposals.cache import ProposalImageError, load_proposals
from spp_det.proposals.precomputed import write_schema
from spp_det.runtime import num_workers
from spp_det.settings import RunSettings
from spp_det.stages import BY_NAME, stage

log = logging.getLogger(__name__)

def splits_to_fill(rs: RunSettings) -> list[str]:
    """``proposals.split``, or the splits the stage being run reads (``stage``'s declaration:
    ``spp-det train`` reads no test image, and eval computes their proposals in workers beside the
    network; ``spp-det proposals``, and a config of no stage, fill train, val (when set) and test),
    without repeats."""
    if rs.proposals.split:
        return [str(rs.proposals.split)]
    roles = BY_NAME.get(str(rs.stage), stage("proposals")).splits
    names = [getattr(rs.data, f"{role}_split") for role in roles]
    return list(dict.fromkeys(str(n) for n in names if n))


def run(cfg) -> int:
    """Fill the cache for ``splits_to_fill``."""
    rs = RunSettings.of(cfg)
    splits, export = splits_to_fill(rs), rs.proposals.export
    workers = num_workers(rs.num_workers)
    exported: dict = {}
    bad: dict[str, str] = {}
    order: list[str] = []  # image ids in split order: the export's order whatever the number of ranks
    for split in splits:
        records = load_split(rs.data, split)
        order += [r.image_id for r in records]
        try:
            boxes = load_proposals(distributed.shard(records), rs.proposals, rs.cache_dir, workers=workers, progress=True)
        except ProposalImageError as exc:
            bad.update(exc.bad)
            continue
        n = [len(b) for b in boxes.values()]
        log.info("proposals %s: %d images, %.0f boxes per image (min %d, max %d), backend %s",
                 split, len(n), sum(n) / max(len(n), 1), min(n, default=0), max(n, default=0), rs.proposals.backend)
        if export:
            exported.update(boxes)
    parts = distributed.gather((exported, bad))
    if not distributed.is_main():
        return 0
    exported, bad = ({k: v for part in parts for k, v in part[i].items()} for i in (0, 1))
    exported = {i: exported[i] for i in dict.fromkeys(order) if i in exported}
    if bad:
        log.error("%s", ProposalImageError(bad))
        return 1
    if export:
        path = write_schema(export, exported)
        log.info("wrote %d images' boxes (%s) to %s", len(exported), ", ".join(splits), path)
    return 0
