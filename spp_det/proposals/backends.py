"""Proposal backends: an RGB ``uint8 [H, W, 3]`` image -> ranked boxes ``float32 [N, 4]``.

Every backend returns boxes in the internal convention (0-based continuous ``x1, y1, x2, y2``,
pixel column ``x`` covers ``[x, x + 1)``) in its ranking order, best first; clipping, duplicate
removal and the ``max_boxes`` cut are done once, in ``postprocess``.

Selective search (Uijlings et al., IJCV 2013) groups a Felzenszwalb-Huttenlocher
over-segmentation hierarchically; *diversification* runs several hierarchies (colour spaces x
Felzenszwalb k x similarity strategies) and merges them. Each box gets Uijlings' rank
``rand * position-in-its-hierarchy`` so the first boxes of the merged list come from every
hierarchy. The randomness is seeded (``proposals.seed``), so the same image and settings always
give the same boxes.

EdgeBoxes (Zitnick & Dollar, ECCV 2014; SPP-net TPAMI Sec. 4.3 uses it for speed) scores windows by
the edge contours wholly inside them; ``_edgeboxes_once`` feeds OpenCV's implementation an edge map
computed here from image gradients, so no trained edge model file is needed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import warnings

import cv2
import numpy as np

from spp_det.errors import UserError
from spp_det.proposals.postprocess import interleave
from spp_det.settings import ProposalsSettings

# Colour spaces by the names Uijlings et al. use (Sec. 3.2); the image arrives as RGB.
COLOR_SPACES = {
    "rgb": None,
    "hsv": cv2.COLOR_RGB2HSV,
    "lab": cv2.COLOR_RGB2Lab,
    "ycrcb": cv2.COLOR_RGB2YCrCb,
    "gray": cv2.COLOR_RGB2GRAY,
}


def _convert(image: np.ndarray, space: str) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` -> the colour space ``space`` (uint8, 3 channels except gray)."""
    key = str(space).lower()
    if key not in COLOR_SPACES:
        raise UserError(f"proposals.color_spaces: unknown colour space {space!r} (choose from {', '.join(COLOR_SPACES)})")
    return image if COLOR_SPACES[key] is None else cv2.cvtColor(image, COLOR_SPACES[key])


def _resolutions(resize_to) -> list[int | None]:
    """``proposals.resize_to`` as a list: ``null`` -> ``[None]``, ``300`` -> ``[300]``, lists kept."""
    if resize_to is None:
        return [None]
    if isinstance(resize_to, (int, float)):
        return [int(resize_to)]
    out = [None if r is None else int(r) for r in resize_to]
    if not out or any(r is not None and r <= 0 for r in out):
        raise UserError(f"proposals.resize_to must be null, a positive shorter side or a list of them, not {list(resize_to)!r}")
    return out


def _shrink(image: np.ndarray, shorter_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale so the shorter side is ``shorter_side`` (never upscale) -> (image, factor)."""
    h, w = image.shape[:2]
    if shorter_side is None or min(h, w) <= shorter_side:
        return image, 1.0
    factor = shorter_side / min(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), factor


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None)


def _seed_c_rand(seed: int) -> None:
    """OpenCV ranks regions with the C library's ``rand()`` (selectivesearchsegmentation.cpp),
    which is never seeded: the order would depend on what the process ran before. Seed it."""
    try:
        _libc().srand(ctypes.c_uint(int(seed)))
    except (OSError, AttributeError):  # no libc symbol table (not Linux/macOS): order may vary
        pass


# Similarity strategies by letters: c colour, t texture, s size, f fill (Uijlings Sec. 3.2).
_STRATEGY_FACTORIES = {
    "c": "createSelectiveSearchSegmentationStrategyColor",
    "t": "createSelectiveSearchSegmentationStrategyTexture",
    "s": "createSelectiveSearchSegmentationStrategySize",
    "f": "createSelectiveSearchSegmentationStrategyFill",
}


def _opencv_strategy(letters: str):
    seg = cv2.ximgproc.segmentation
    letters = str(letters).lower()
    if not letters or any(ch not in _STRATEGY_FACTORIES for ch in letters):
        raise UserError(f"proposals.strategies: {letters!r} is not a combination of c (colour), t (texture), "
                        "s (size), f (fill), e.g. 'ctsf'")
    multiple = seg.createSelectiveSearchSegmentationStrategyMultiple()
    for ch in letters:
        multiple.addStrategy(getattr(seg, _STRATEGY_FACTORIES[ch])(), 1.0 / len(letters))
    return multiple


def _opencv_once(image: np.ndarray, s: ProposalsSettings) -> np.ndarray:
    """One OpenCV selective-search run on RGB ``image`` -> ranked ``float32 [N, 4]`` boxes."""
    if not hasattr(cv2, "ximgproc"):
        raise UserError("proposals.backend=opencv needs OpenCV's contrib modules (cv2.ximgproc): install "
                        "opencv-contrib-python-headless instead of opencv-python(-headless), not beside it")
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    sigma = float(s.sigma)
    if s.mode == "custom":  # else one of OpenCV's presets (ProposalsSettings checks the mode)
        for space in s.color_spaces:
            ss.addImage(_convert(image, space))
        for k in s.k:
            ss.addGraphSegmentation(seg.createGraphSegmentation(sigma, float(k), int(s.min_region)))
        for letters in s.strategies:
            ss.addStrategy(_opencv_strategy(letters))
    else:
        ss.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))  # OpenCV's presets convert from BGR
        base_k, inc_k = int(s.base_k), int(s.inc_k)
        if s.mode == "fast":
            ss.switchToSelectiveSearchFast(base_k, inc_k, sigma)
        elif s.mode == "quality":
            ss.switchToSelectiveSearchQuality(base_k, inc_k, sigma)
        else:
            ss.switchToSingleStrategy(base_k, sigma)
    _seed_c_rand(int(s.seed))
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h in pixels
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _uijlings_rank(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uijlings et al. Sec. 4.4: a region at position ``p`` of its hierarchy (1 = the whole image,
    the last merge) gets value ``rand * p``; lower values come first."""
    position = np.arange(n, 0, -1, dtype=np.float64)  # regions are listed first-created first
    return rng.random(n) * position


def selectivesearch_boxes(image: np.ndarray, s: ProposalsSettings) -> np.ndarray:
    """The ``selectivesearch`` package over colour spaces x Felzenszwalb k values, merged by rank.

    ``float32 [N, 4]`` ranked. The package returns regions in creation order; its rects are
    ``(min_x, min_y, max_x - min_x, max_y - min_y)`` with inclusive max pixels, hence the ``+ 1``.
    """
    import selectivesearch

    lists = []
    for shorter_side in _resolutions(s.resize_to):
        small, factor = _shrink(image, shorter_side)
        for space in s.color_spaces:
            converted = _convert(small, space)
            if converted.ndim == 2:
                converted = np.repeat(converted[:, :, None], 3, axis=2)
            for k in s.scales:
                with warnings.catch_warnings():
                    # the package runs scikit-image's LBP on float images; its warning repeats per call
                    warnings.filterwarnings("ignore", message=".*local_binary_pattern.*", category=UserWarning)
                    _, regions = selectivesearch.selective_search(
                        converted, scale=float(k), sigma=float(s.sigma), min_size=int(s.min_region))
                rects = np.array([r["rect"] for r in regions], dtype=np.float32).reshape(-1, 4)
                boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] + 1.0], axis=1) / factor
                lists.append(boxes)
    if not lists:
        return np.zeros((0, 4), np.float32)
    rng = np.random.default_rng(int(s.seed))
    ranks = np.concatenate([_uijlings_rank(len(b), rng) for b in lists])
    return np.concatenate(lists)[np.argsort(ranks, kind="stable")].astype(np.float32)


def gradient_edges(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Thin edges and their orientation for EdgeBoxes: RGB ``uint8 [H, W, 3]`` -> (edge strength
    ``float32 [H, W]`` in [0, 1], orientation ``float32 [H, W]`` in [0, pi)).

    EdgeBoxes wants a structured-forest edge map (a trained model file, not shipped with OpenCV's
    wheels); the gradient of the Gaussian-smoothed Lab image (the strongest of its 3 channels, as
    Canny does for colour) thinned by Canny's non-maximum suppression stands in for it. Strength is
    the magnitude over its 99th percentile (clipped to 1: EdgeBoxes ignores edges under
    ``edge_min_mag``); orientation is the edge's tangent (the gradient turned by 90 degrees), the
    direction EdgeBoxes groups edges along.
    """
    lab = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2Lab), (0, 0), float(sigma))
    dx = cv2.Sobel(lab, cv2.CV_16S, 1, 0, ksize=3)
    dy = cv2.Sobel(lab, cv2.CV_16S, 0, 1, ksize=3)
    # Canny on the derivatives: its non-maximum suppression along the gradient (strongest channel);
    # thresholds near zero keep weak edges too (strength decides below, not hysteresis)
    thin = cv2.Canny(dx, dy, 1, 1, L2gradient=True) > 0
    gx, gy = dx.astype(np.float32), dy.astype(np.float32)
    magnitude = gx * gx + gy * gy  # [H, W, 3]
    strongest = magnitude.argmax(axis=2)[..., None]
    magnitude = np.sqrt(np.take_along_axis(magnitude, strongest, axis=2)[..., 0])
    gx, gy = np.take_along_axis(gx, strongest, 2)[..., 0], np.take_along_axis(gy, strongest, 2)[..., 0]
    scale = float(np.percentile(magnitude, 99)) + 1e-6
    edges = np.where(thin, np.minimum(magnitude / scale, 1.0), 0.0).astype(np.float32)
    orientation = np.mod(np.arctan2(gy, gx) + np.pi / 2, np.pi).astype(np.float32)
    return edges, orientation


def _edgeboxes_once(image: np.ndarray, s: ProposalsSettings) -> np.ndarray:
    """One EdgeBoxes run (OpenCV ``cv2.ximgproc.EdgeBoxes``) on ``gradient_edges`` of RGB ``image``
    -> ``float32 [N, 4]``, best score first."""
    if not hasattr(cv2, "ximgproc"):
        raise UserError("proposals.backend=edgeboxes needs OpenCV's contrib modules (cv2.ximgproc): install "
                        "opencv-contrib-python-headless instead of opencv-python(-headless), not beside it")
    edges, orientation = gradient_edges(image, s.edge_sigma)
    finder = cv2.ximgproc.createEdgeBoxes(alpha=float(s.alpha), beta=float(s.beta), minScore=float(s.min_score),
                                          edgeMinMag=float(s.edge_min_mag), maxBoxes=int(s.max_boxes or 10000))
    rects, _ = finder.getBoundingBoxes(edges, orientation)  # x, y, w, h, sorted by score
    rects = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


# One run of a backend on the image as given (``ranked_boxes`` does the resolutions and passes);
# selectivesearch_boxes does its own resolutions and merge (Uijlings' randomised rank).
BACKENDS = {
    "opencv": _opencv_once,
    "selectivesearch": selectivesearch_boxes,
    "edgeboxes": _edgeboxes_once,
}


def ranked_boxes(image: np.ndarray, settings: ProposalsSettings) -> np.ndarray:
    """The backend once per pass and ``resize_to`` resolution, boxes scaled back to ``image``'s
    pixels and interleaved -> ``float32 [N, 4]``, ranked.

    ``proposals.passes`` (optional) is a list of setting overrides, one run each, any backend (e.g.
    OpenCV's fast mode on a downscaled image plus a small-k run at full resolution, or EdgeBoxes plus
    a coarse selective search); without it there is one pass with the settings as they are.
    """
    lists, done = [], set()
    for run in settings.runs():
        if run.backend == "selectivesearch":
            lists.append(selectivesearch_boxes(image, run))
            continue
        for shorter_side in _resolutions(run.resize_to):
            small, factor = _shrink(image, shorter_side)
            run_key = (small.shape, repr(dataclasses.replace(run, resize_to=None)))
            if run_key in done:  # image already smaller than this resolution: the same run again
                continue
            done.add(run_key)
            lists.append(BACKENDS[run.backend](small, run) / factor)
    return interleave(lists)
