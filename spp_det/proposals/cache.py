"""Proposals: compute, cache one entry per image, fill the cache for many images in parallel.

Cache layout (every cache is keyed by what produced it: docs/ARCHITECTURE.md "Data flow")::

    <cache_dir>/proposals/<backend>-<settings hash>/settings.json       what the hash covers
    <cache_dir>/proposals/<backend>-<settings hash>/<sha1[:2]>/<sha1>.npy   float32 [N, 4]

``sha1`` is the image file's content hash (``spp_det.io.hash_file``), so a renamed or copied
image hits and an edited one misses; the settings hash covers every setting that changes the
boxes, so a changed setting computes new entries and never reads stale ones. Each entry is
written atomically as soon as its image is done, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from spp_det.artifact import PROPOSALS_CACHE, cache_folder
from spp_det.boxes import flip_boxes
from spp_det.data.images import ImageError, read_image
from spp_det.errors import UserError
from spp_det.io import atomic_path, hash_file, hash_settings, write_json
from spp_det.proposals.backends import ranked_boxes
from spp_det.proposals.postprocess import postprocess_boxes
from spp_det.proposals.precomputed import precomputed_boxes
from spp_det.settings import ProposalsSettings

log = logging.getLogger(__name__)

# Bump when the code that turns an image into boxes changes its output for the same settings.
ALGORITHM_VERSION = 1


class ProposalImageError(UserError):
    """Some images of a set could not be read; ``bad`` maps each file to its reason."""

    def __init__(self, bad: dict[str, str]):
        self.bad = dict(bad)
        lines = "\n".join(f"  {path}: {reason}" for path, reason in sorted(self.bad.items()))
        super().__init__(f"proposals: {len(self.bad)} image(s) could not be read (every other image's boxes "
                         f"are cached):\n{lines}")


def compute_proposals(image: np.ndarray, settings: ProposalsSettings) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` -> ``float32 [N, 4]`` proposals (backend + post-processing, no cache).

    Boxes are 0-based continuous ``x1, y1, x2, y2`` in ``image``'s pixels, clipped, without
    duplicates or boxes with a side under ``proposals.min_size``, at most ``proposals.max_boxes``,
    in the backend's ranking order.
    """
    s = ProposalsSettings.of(settings)
    if s.backend == "precomputed":
        raise UserError("proposals.backend=precomputed reads boxes by image id: use load_proposals / "
                        "cached_proposals, not compute_proposals")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"compute_proposals expects an RGB uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    boxes = ranked_boxes(np.ascontiguousarray(image), s)
    return postprocess_boxes(boxes, w, h, float(s.min_size), s.max_boxes)


def box_settings(s: ProposalsSettings, with_file: bool = False) -> dict:
    """Every setting that changes the boxes (and nothing that only says where they go); ``with_file``:
    with ``backend=precomputed``, the boxes file's SHA-1 too (the settings key of what trains on them)."""
    key = {"backend": s.backend, "algorithm_version": ALGORITHM_VERSION, "max_boxes": s.max_boxes, "min_size": s.min_size}
    others = sorted({str(p.get("backend", s.backend)) for p in s.passes or ()} - {s.backend})
    for backend in (s.backend, *others):  # passes run other backends: their settings change the boxes too
        key.update({name: getattr(s, name) for name in s.BOX_KEYS.get(backend, ())})
    if {s.backend, *others} & {"opencv", "edgeboxes"}:
        key["opencv"] = cv2.__version__  # OpenCV's selective search has changed between releases
    if with_file and s.backend == "precomputed" and s.file and Path(s.file).is_file():
        key["file"] = hash_file(s.file)
    return key


def settings_dir(cache_dir: str | Path, settings: ProposalsSettings) -> Path:
    """``<cache_dir>/proposals/<backend>-<settings hash>``."""
    key = box_settings(settings)
    return cache_folder(cache_dir, PROPOSALS_CACHE) / f"{key['backend']}-{hash_settings(key)}"


def entry_path(folder: Path, content_hash: str) -> Path:
    return folder / content_hash[:2] / f"{content_hash}.npy"


def read_entry(path: Path) -> np.ndarray | None:
    """A cached ``float32 [N, 4]`` or ``None`` when absent or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        boxes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        log.warning("%s: unreadable proposals cache entry (%s); recomputing", path, exc)
        return None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        log.warning("%s: proposals cache entry has shape %s, not [N, 4]; recomputing", path, list(boxes.shape))
        return None
    return boxes.astype(np.float32, copy=False)


def write_entry(path: Path, boxes: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(boxes, dtype=np.float32), allow_pickle=False)


def _write_settings(folder: Path, settings: ProposalsSettings) -> None:
    if not (folder / "settings.json").is_file():
        write_json(box_settings(settings), folder / "settings.json")


def _compute_entry(task: tuple) -> tuple[str, np.ndarray | None, str | None]:
    """Worker: read one image, compute its boxes, write its cache entry -> (path, boxes, error).
    ``task``: ``(path, content hash, entry, settings[, max_pixels])``."""
    path, _, entry, settings, *limit = task
    try:
        image = read_image(path, max_pixels=limit[0] if limit else None)
    except ImageError as exc:
        return path, None, exc.reason
    boxes = compute_proposals(image, settings)
    write_entry(entry, boxes)
    return path, boxes, None


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would oversubscribe the cores


def proposals_for_paths(paths: Iterable[str | Path], settings: ProposalsSettings, cache_dir: str | Path, workers: int = 0,
                        progress: bool = True, desc: str = "proposals") -> dict[str, np.ndarray]:
    """``{str(path): float32 [N, 4]}`` for image files, from the cache or computed in parallel.

    Misses run in ``workers`` processes (0 = all cores). Unreadable images do not stop the
    others: every good image is computed and cached, then ``ProposalImageError`` lists all bad files.
    """
    from tqdm import tqdm

    from spp_det.runtime import num_workers  # here: runtime imports torch, which each spawned worker would load too

    folder = settings_dir(cache_dir, settings)
    out: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    misses = []
    for path in dict.fromkeys(str(p) for p in paths):
        try:
            content = hash_file(path)
        except OSError as exc:
            bad[path] = f"cannot read file ({exc.strerror or exc})"
            continue
        entry = entry_path(folder, content)
        boxes = read_entry(entry)
        if boxes is None:
            misses.append((path, content, entry, settings))
        else:
            out[path] = boxes
    if misses:
        _write_settings(folder, settings)
        n_proc = min(num_workers(workers), len(misses))
        log.info("proposals: %d cached, computing %d with %d process(es) into %s", len(out), len(misses), n_proc, folder)
        bar = tqdm(total=len(misses), desc=desc, unit="img", disable=not progress)
        if n_proc <= 1:
            results = map(_compute_entry, misses)
            pool = None
        else:
            # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would copy mid-state.
            pool = multiprocessing.get_context("spawn").Pool(n_proc, initializer=_init_worker)
            results = pool.imap_unordered(_compute_entry, misses, chunksize=1)
        try:
            for path, boxes, error in results:
                if error is None:
                    out[path] = boxes
                else:
                    bad[path] = error
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
    if bad:
        raise ProposalImageError(bad)
    return out


def load_proposals(records, settings: ProposalsSettings, cache_dir: str | Path, workers: int = 0,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """``{image_id: float32 [N, 4]}``: boxes of the *unflipped* image of each ``ImageRecord``.

    ``record.flipped`` is ignored (callers mirror with ``spp_det.boxes.flip_boxes``). Cached
    entries are read, misses computed in parallel and cached; ``proposals.backend=precomputed``
    reads ``proposals.file`` instead (a missing id is a ``UserError`` naming it). Raises
    ``ProposalImageError`` listing every unreadable image after caching all the others.
    """
    s = ProposalsSettings.of(settings)
    records = list({r.image_id: r for r in records}.values())
    if s.backend == "precomputed":
        return {r.image_id: postprocess_boxes(precomputed_boxes(s.file, r.image_id), r.width, r.height,
                                              float(s.min_size), s.max_boxes) for r in records}
    by_path = proposals_for_paths([r.path for r in records], s, cache_dir, workers, progress)
    return {r.image_id: by_path[str(r.path)] for r in records}


def record_proposals(record, proposals: dict[str, np.ndarray]) -> np.ndarray:
    """The proposal boxes ``float32 [N, 4]`` of ``record``'s image from ``load_proposals``'s
    ``{image_id: boxes}`` (unflipped images), mirrored when ``record`` is a flipped record."""
    boxes = np.asarray(proposals[record.image_id], np.float32).reshape(-1, 4)
    return flip_boxes(boxes, record.width) if record.flipped else boxes


def cached_proposals(path: str | Path, image: np.ndarray, settings: ProposalsSettings, cache_dir: str | Path) -> np.ndarray:
    """``float32 [N, 4]`` proposals of the image file ``path`` whose pixels are ``image``
    (RGB ``uint8 [H, W, 3]``), cached by the file's content + settings. With the precomputed
    backend the file's stem is its image id."""
    s = ProposalsSettings.of(settings)
    h, w = np.asarray(image).shape[:2]
    if s.backend == "precomputed":
        return postprocess_boxes(precomputed_boxes(s.file, Path(path).stem), w, h, float(s.min_size), s.max_boxes)
    folder = settings_dir(cache_dir, s)
    entry = entry_path(folder, hash_file(path))
    boxes = read_entry(entry)
    if boxes is None:
        boxes = compute_proposals(image, s)
        _write_settings(folder, s)
        write_entry(entry, boxes)
    return boxes


def _missing_entries(folder: Path, paths: list[str]) -> dict[str, Path]:
    """The cache entry in ``folder`` of each path whose boxes are not cached yet (each file hashed once;
    an unreadable file is left out: the caller reports it when it reads the file)."""
    missing = {}
    for path in paths:
        try:
            entry = entry_path(folder, hash_file(path))
        except OSError:
            continue
        if not entry.is_file():
            missing[path] = entry
    return missing


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ProposalPrefetcher:
    """Selective search of the *next* images in worker processes while the caller runs the network
    on the current one, so a folder costs the larger of the two, not their sum (``detect``, ``eval``).

    ``paths`` is the order the caller will ask in; ``get(path, image)`` returns ``float32 [N, 4]``
    exactly as ``cached_proposals`` would (same cache entries), waiting for a worker when one is
    computing that image. At most ``lookahead`` images are in flight, so memory stays bounded and
    nothing is computed far ahead of a run that stops early. ``workers=0``, a precomputed backend or
    every box already cached: no processes, ``get`` is ``cached_proposals``. While the workers run,
    torch in this process uses the other cores (``cores - workers`` threads, at least 1). Worker processes read images with ``max_pixels``
    (the caller's limit), so an oversized file is refused there as it is by the caller.
    """

    def __init__(self, paths: Iterable[str | Path], settings: ProposalsSettings, cache_dir: str | Path, workers: int = 0, *,
                 lookahead: int | None = None, max_pixels: int | None = None):
        from concurrent.futures import ProcessPoolExecutor

        self.settings, self.cache_dir = ProposalsSettings.of(settings), cache_dir
        self.paths = [str(p) for p in paths]
        self.position = {p: i for i, p in enumerate(self.paths)}
        self.max_pixels = max_pixels
        self.lookahead = int(lookahead or 2 * max(workers, 1))
        self.futures: dict[str, object] = {}
        self.next = 0  # index of the first path not yet submitted
        self.pool = None
        self.torch_threads = None
        self.missing: dict[str, Path] = {}  # path -> its cache entry, for the files not cached at the start
        if workers > 0 and self.settings.backend != "precomputed" and self.paths:
            self.folder = settings_dir(cache_dir, self.settings)
            self.missing = _missing_entries(self.folder, self.paths)
            if self.missing:
                # spawn, not fork: the parent holds torch/OpenMP threads that a fork would copy mid-state
                self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker)
                # the network in this process gets the cores the workers leave: OpenMP threads that
                # share a core with a busy worker wait for each other at every layer (detect on 2
                # cores: 0.34 images/s with 2 workers + 2 threads, 0.84 with 1 worker + 1 thread)
                import torch

                self.torch_threads = torch.get_num_threads()
                torch.set_num_threads(max(1, _cores() - workers))

    def _submit_ahead(self, upto: int) -> None:
        while self.next < min(upto, len(self.paths)):
            path = self.paths[self.next]
            self.next += 1
            entry = self.missing.get(path)  # None: cached, or unreadable (the caller reports it)
            if entry is not None and path not in self.futures and not entry.is_file():
                _write_settings(self.folder, self.settings)
                self.futures[path] = self.pool.submit(_compute_entry, (path, "", entry, self.settings, self.max_pixels))

    def get(self, path: str | Path, image: np.ndarray) -> np.ndarray:
        """Proposals of ``path`` (pixels ``image``), starting the search of the images after it."""
        path = str(path)
        if self.pool is not None:
            self._submit_ahead(self.position.get(path, -1) + 1 + self.lookahead)
            future = self.futures.pop(path, None)
            if future is not None:
                _, boxes, error = future.result()
                if error is None:
                    return boxes
        return cached_proposals(path, image, self.settings, self.cache_dir)  # cached, precomputed, or the worker failed

    def close(self) -> None:
        if self.pool is not None:
            for future in self.futures.values():
                future.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)
            self.torch_threads = None

    def __enter__(self) -> "ProposalPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
