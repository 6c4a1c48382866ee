"""Selective-search proposals: backends, post-processing, a content-keyed cache, precomputed files.

Public API (docs/CONTRACTS.md "Proposals"); ``settings``: ``spp_det.settings.ProposalsSettings`` (or the
``proposals`` config group, read into them):

- ``compute_proposals(image uint8 [H, W, 3], settings) -> float32 [N, 4]``
- ``load_proposals(records, settings, cache_dir, workers=0, progress=True) -> {image_id: float32 [N, 4]}``
- ``cached_proposals(path, image, settings, cache_dir) -> float32 [N, 4]``
- ``record_proposals(record, proposals) -> float32 [N, 4]`` (mirrored for a flipped record)
- ``ProposalPrefetcher(paths, settings, cache_dir, workers)``: ``get(path, image)`` as
  ``cached_proposals``, with the next images searched in worker processes meanwhile
"""
from spp_det.proposals.cache import (
    ProposalImageError,
    ProposalPrefetcher,
    cached_proposals,
    compute_proposals,
    load_proposals,
    proposals_for_paths,
    record_proposals,
)
from spp_det.proposals.precomputed import ProposalFileError, read_mat, read_schema, write_schema

__all__ = [
    "ProposalFileError", "ProposalImageError", "ProposalPrefetcher", "cached_proposals", "compute_proposals", "load_proposals",
    "proposals_for_paths", "read_mat", "read_schema", "record_proposals", "write_schema",
]
