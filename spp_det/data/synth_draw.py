"""The settings of ``spp-det synth`` and drawing its images (written to disk by ``spp_det.data.synth``).

Classes differ by **shape** only (circle, triangle, square, star, cross, ring; colours are random
per instance), drawn at random rotations and sizes on textured backgrounds (gradients, stripes,
low-frequency blobs, noise) with distractor shapes that belong to no class by construction
(elongated ellipses, straight lines, open arcs, zigzags: nothing round, square or star-like).
Objects occlude each other (later ones are drawn over earlier ones; a box is the full object
extent) and cross image borders (box clipped, ``truncated``); tiny ones are ``difficult``.

Boxes: internal ``x1, y1, x2, y2`` 0-based continuous; a rasterised object covering pixel columns
``c0..c1`` has ``x1 = c0, x2 = c1 + 1``. Image ``i`` is drawn from
``numpy.random.default_rng([seed, i])`` alone, so the same seed gives the same pixels.
"""
from __future__ import annotations

import colorsys
import dataclasses
import math

import cv2
import numpy as np

from spp_det.boxes import box_iou
from spp_det.errors import UserError

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "triangle", "square", "star", "cross", "ring")
DISTRACTORS = ("ellipse", "line", "arc", "zigzag")
AA_SHIFT = 4  # cv2 sub-pixel bits: vertices at 1/16 px, so small rotated shapes stay exact

# --------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """The ``synth`` config group as plain values (see configs/synth/default.yaml for units)."""

    classes: tuple[str, ...] = SHAPES   # the dataset's classes, in label order (configs/synth/default.yaml)
    seed: int = 0
    num_images: int = 300
    pretrain_images: int = 1000   # configs/synth/default.yaml (tests/test_settings.py keeps them equal)
    fractions: tuple[tuple[str, float], ...] = (("train", 0.5), ("val", 0.1), ("test", 0.4))
    min_side: int = 200
    max_side: int = 640
    max_aspect: float = 2.0
    objects_per_image: tuple[int, int] = (1, 5)
    min_object: float = 16
    max_object_frac: float = 0.6
    difficult_below: float = 24
    small_fraction: float = 0.12
    truncated_fraction: float = 0.15
    min_inside: float = 0.5
    max_overlap_iou: float = 0.35
    max_occlusion: float = 0.6
    distractors: tuple[int, int] = (2, 6)
    min_contrast: float = 90
    outline_fraction: float = 0.4
    noise_sigma: tuple[float, float] = (2, 8)
    jpeg_quality: int = 90
    overwrite: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> "SynthSettings":
        """From a DictConfig or dict (unknown keys are an error)."""
        from omegaconf import DictConfig, OmegaConf

        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UserError(f"synth: unknown setting(s) {unknown}; known: {sorted(names)}")
        if "fractions" in raw:
            fr = raw["fractions"]
            if not isinstance(fr, dict) or set(fr) - set(SPLITS):
                raise UserError(f"synth.fractions must map {list(SPLITS)} to fractions, got {fr!r}")
            raw["fractions"] = tuple((s, float(fr.get(s, 0.0))) for s in SPLITS)
        if "classes" in raw:
            raw["classes"] = tuple(raw["classes"])
        for key in ("objects_per_image", "distractors", "noise_sigma"):
            if key in raw:
                value = raw[key]
                if not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] > value[1]:
                    raise UserError(f"synth.{key} must be a [low, high] pair, got {value!r}")
                raw[key] = tuple(value)
        s = cls(**raw)
        s.validate()
        return s

    def validate(self) -> None:
        checks = [
            (self.num_images >= 1, "synth.num_images must be >= 1"),
            (self.pretrain_images >= 0, "synth.pretrain_images must be >= 0"),
            (all(f >= 0 for _, f in self.fractions) and sum(f for _, f in self.fractions) > 0,
             "synth.fractions must be non-negative and not all zero"),
            (16 <= self.min_side <= self.max_side, "synth.min_side must be >= 16 and <= synth.max_side"),
            (self.max_aspect >= 1, "synth.max_aspect must be >= 1"),
            (self.objects_per_image[0] >= 1, "synth.objects_per_image must start at >= 1"),
            (4 <= self.min_object <= self.max_object_frac * self.min_side,
             "synth.min_object must be >= 4 px and <= max_object_frac * min_side"),
            (0 < self.max_object_frac <= 1, "synth.max_object_frac must be in (0, 1]"),
            (self.min_object <= self.difficult_below, "synth.difficult_below must be >= synth.min_object"),
            (0 <= self.small_fraction <= 1 and 0 <= self.truncated_fraction <= 1 and 0 <= self.outline_fraction <= 1,
             "synth.*_fraction must be in [0, 1]"),
            (0 < self.min_inside <= 1 and 0 <= self.max_occlusion < 1, "synth.min_inside / max_occlusion out of range"),
            (1 <= self.jpeg_quality <= 100, "synth.jpeg_quality must be in 1..100"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message} (got {self})")


# --------------------------------------------------------------------------------------------
# Shapes (unit polygons, centred; the generator rotates and scales them)


def _regular(n: int, radius: float = 1.0, start: float = math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), -radius * np.sin(angles)], axis=1)


def _star(rng: np.random.Generator) -> np.ndarray:
    outer = _regular(5)
    inner = _regular(5, radius=rng.uniform(0.38, 0.5), start=math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)  # outer, inner, outer, ...


def _cross(rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.28, 0.36)  # arm half-width: thick enough to read as a plus at 24 px
    return np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w),
                     (-1, -w), (-1, w), (-w, w), (-w, 1)], dtype=np.float64)


POLYGONS = {
    "triangle": lambda rng: _regular(3),
    "square": lambda rng: np.array([(1, 1), (1, -1), (-1, -1), (-1, 1)], dtype=np.float64),
    "star": _star,
    "cross": _cross,
}


def _shape_mask(shape: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased mask ``uint8 [h, w]`` (0..255) of one randomly rotated ``shape`` whose box
    has a longer side of about ``size`` px, drawn in a patch with a 2 px margin."""
    margin = 2
    if shape in ("circle", "ring"):
        r = size / 2
        n = int(math.ceil(size)) + 2 * margin
        mask = np.zeros((n, n), np.uint8)
        c = int(round(n / 2 * (1 << AA_SHIFT)))
        cv2.circle(mask, (c, c), int(round(r * (1 << AA_SHIFT))), 255, -1, cv2.LINE_AA, AA_SHIFT)
        if shape == "ring":  # inner radius 50-65% of the outer: a visible hole at every size
            inner = r * rng.uniform(0.5, 0.65)
            cv2.circle(mask, (c, c), int(round(inner * (1 << AA_SHIFT))), 0, -1, cv2.LINE_AA, AA_SHIFT)
        return mask
    poly = POLYGONS[shape](rng)
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    poly = poly @ rot.T
    lo, hi = poly.min(0), poly.max(0)
    poly = (poly - (lo + hi) / 2) * (size / (hi - lo).max())  # box longer side = size, centred at 0
    extent = np.ceil(np.abs(poly).max(0) * 2).astype(int) + 2 * margin  # (w, h)
    mask = np.zeros((extent[1], extent[0]), np.uint8)
    # cv2 puts integer coordinates at pixel centres: continuous position = index + 0.5
    pts = (poly + extent / 2 - 0.5) * (1 << AA_SHIFT)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA, AA_SHIFT)
    return mask


# --------------------------------------------------------------------------------------------
# Backgrounds, distractors, colours


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background ``float32 [h, w, 3]`` RGB: a two-colour gradient plus stripes and/or
    low-frequency blobs. Moderate amplitudes: texture, not objects."""
    c0 = _hsv(rng.uniform(), rng.uniform(0, 0.55), rng.uniform(0.2, 0.9))
    c1 = _hsv(rng.uniform(), rng.uniform(0, 0.55), rng.uniform(0.2, 0.9))
    a = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    proj = xs * math.cos(a) + ys * math.sin(a)  # [h, w]
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if rng.uniform() < 0.5:  # stripes
        b = rng.uniform(0, 2 * math.pi)
        period = rng.uniform(6, 40)
        wave = np.sin((xs * math.cos(b) + ys * math.sin(b)) * (2 * math.pi / period))
        img += wave[..., None] * (rng.uniform(8, 25) * rng.choice([-1.0, 1.0], 3).astype(np.float32))
    if rng.uniform() < 0.7:  # low-frequency blobs
        cell = rng.uniform(20, 80)
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        grid = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
        img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 30)
    return img


def _draw_distractor(img: np.ndarray, rng: np.random.Generator) -> None:
    """One shape of no class, by construction unlike every class: elongated ellipses (axis ratio
    >= 2.5), straight lines, open arcs (<= 180 degrees, thin), zigzag polylines."""
    h, w = img.shape[:2]
    short = min(h, w)
    colour = tuple(float(c) for c in _hsv(rng.uniform(), rng.uniform(0.2, 1), rng.uniform(0.2, 1)))
    kind = DISTRACTORS[rng.integers(len(DISTRACTORS))]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    if kind == "ellipse":
        major = rng.uniform(8, 0.2 * short)
        minor = major / rng.uniform(2.5, 5)
        cv2.ellipse(img, (int(cx), int(cy)), (int(major), max(1, int(minor))), rng.uniform(0, 180), 0, 360,
                    colour, -1, cv2.LINE_AA)
    elif kind == "line":
        length, a = rng.uniform(0.15, 0.5) * short, rng.uniform(0, math.pi)
        dx, dy = length / 2 * math.cos(a), length / 2 * math.sin(a)
        cv2.line(img, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), colour,
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    elif kind == "arc":
        r = rng.uniform(10, 0.3 * short)
        start = rng.uniform(0, 360)
        cv2.ellipse(img, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.6, 1))), rng.uniform(0, 180),
                    start, start + rng.uniform(40, 180), colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    else:  # zigzag
        n = int(rng.integers(3, 7))
        step = rng.uniform(0.05, 0.15) * short
        a = rng.uniform(0, 2 * math.pi)
        pts, x, y = [], cx, cy
        for i in range(n):
            pts.append((int(x), int(y)))
            turn = a + (0.9 if i % 2 else -0.9)
            x, y = x + step * math.cos(turn), y + step * math.sin(turn)
        cv2.polylines(img, [np.array(pts, np.int32)], False, colour, int(rng.integers(1, 4)), cv2.LINE_AA)


def _pick_colour(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random saturated colour at least ``min_contrast`` (RGB distance) from ``under`` (the
    mean of what lies beneath the object), so selective search can separate it; falls back to
    the most distant of the tries."""
    best, best_d = None, -1.0
    for _ in range(24):
        c = _hsv(rng.uniform(), rng.uniform(0.35, 1), rng.uniform(0.3, 1))
        d = float(np.linalg.norm(c - under))
        if d >= min_contrast:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


# --------------------------------------------------------------------------------------------
# One image


@dataclasses.dataclass
class SynthObject:
    """One drawn object: ``box`` internal (clipped) float [4]; ``truncated`` when the full box
    left the image; ``difficult`` when the clipped box's longer side < ``difficult_below``."""

    name: str
    box: np.ndarray
    truncated: bool
    difficult: bool
    occluded: bool  # partly hidden by a later object (for the summary; VOC 2007 has no tag)


def _overlap(ox: int, oy: int, ph: int, pw: int, h: int, w: int):
    """Image and patch slices where a patch at ``(ox, oy)`` of size ``ph x pw`` meets the image."""
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + pw, w), min(oy + ph, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))


def _image_size(rng: np.random.Generator, s: SynthSettings) -> tuple[int, int]:
    """``(width, height)``: longer side uniform in [min_side, max_side], aspect log-uniform up to
    ``max_aspect`` (limited so the shorter side stays >= min_side), orientation random."""
    long_side = rng.uniform(s.min_side, s.max_side)
    aspect = math.exp(rng.uniform(0, math.log(min(s.max_aspect, long_side / s.min_side))))
    short_side = max(s.min_side, long_side / aspect)
    long_side, short_side = int(round(long_side)), int(round(short_side))
    return (long_side, short_side) if rng.uniform() < 0.5 else (short_side, long_side)


def _object_size(rng: np.random.Generator, s: SynthSettings, short: int) -> float:
    top = s.max_object_frac * short
    if rng.uniform() < s.small_fraction:  # the tiny, difficult ones
        return rng.uniform(s.min_object, s.difficult_below - 1)
    lo = min(s.difficult_below + 1, top)
    return math.exp(rng.uniform(math.log(lo), math.log(top)))  # log-uniform: as many small as large


def draw_image(seed: int, index: int, s: SynthSettings, classes: list[str]) -> tuple[np.ndarray, list[SynthObject], int]:
    """Image ``index`` of the dataset with ``seed``: ``(RGB uint8 [H, W, 3], objects, dropped)``
    where ``dropped`` counts planned objects left out because they would be hidden by more than
    ``max_occlusion``. Objects are listed in drawing order (later ones on top).

    One function over 60 lines on purpose: every draw from ``rng`` happens here in one visible
    order, and that order is what makes a seed give the same dataset in every version."""
    rng = np.random.default_rng([seed, index])
    w, h = _image_size(rng, s)
    short = min(w, h)
    img = _background(rng, h, w)
    for _ in range(int(rng.integers(s.distractors[0], s.distractors[1] + 1))):
        _draw_distractor(img, rng)

    # Plan: shape, mask, position for each object; boxes from the rasterised mask (full extent).
    planned = []  # (name, mask uint8, ox, oy, full_box [4])
    for _ in range(int(rng.integers(s.objects_per_image[0], s.objects_per_image[1] + 1))):
        name = classes[int(rng.integers(len(classes)))]
        mask = _shape_mask(name, _object_size(rng, s, short), rng)
        on = mask >= 128
        rows, cols = np.nonzero(on.any(1))[0], np.nonzero(on.any(0))[0]
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # tight extent in the patch
        bw, bh = c1 - c0, r1 - r0
        truncate = rng.uniform() < s.truncated_fraction
        for _try in range(30):
            if truncate:  # push the box across one border by 15-50% of its size
                side = int(rng.integers(4))
                f = rng.uniform(0.15, 0.5)
                bx = rng.uniform(-f * bw, w - bw + f * bw) if side >= 2 else (-f * bw if side == 0 else w - (1 - f) * bw)
                by = rng.uniform(-f * bh, h - bh + f * bh) if side < 2 else (-f * bh if side == 2 else h - (1 - f) * bh)
            else:
                if bw > w or bh > h:
                    break
                bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            ox, oy = int(round(bx)) - c0, int(round(by)) - r0
            full = np.array([ox + c0, oy + r0, ox + c1, oy + r1], np.float32)
            inside = _overlap(ox, oy, *mask.shape, h, w)
            if inside is None or on[inside[1]].sum() < s.min_inside * on.sum():
                continue
            if planned and box_iou(full[None], np.stack([p[4] for p in planned])).max() > s.max_overlap_iou:
                continue
            planned.append((name, mask, ox, oy, full))
            break

    # Occlusion, from the top layer down: keep an object only if enough of it stays visible.
    covered = np.zeros((h, w), bool)
    keep, occluded = [], []
    for name, mask, ox, oy, full in reversed(planned):
        on = mask >= 128
        img_sl, patch_sl = _overlap(ox, oy, *mask.shape, h, w)
        mine = on[patch_sl]
        visible = (mine & ~covered[img_sl]).sum()
        if visible < (1 - s.max_occlusion) * on.sum():
            continue
        occluded.append(bool((mine & covered[img_sl]).any()))
        covered[img_sl] |= mine
        keep.append((name, mask, ox, oy, full))
    keep.reverse()
    occluded.reverse()
    dropped = len(planned) - len(keep)

    # Render in drawing order: solid fill with a mild linear shading, optional darker outline.
    objects = []
    for (name, mask, ox, oy, full), occ in zip(keep, occluded):
        img_sl, patch_sl = _overlap(ox, oy, *mask.shape, h, w)
        alpha = mask[patch_sl].astype(np.float32)[..., None] / 255.0  # [ph, pw, 1]
        region = img[img_sl]
        weights = alpha[..., 0] >= 0.5
        under = region[weights].mean(0) if weights.any() else region.reshape(-1, 3).mean(0)
        colour = _pick_colour(rng, under, s.min_contrast)
        ph, pw = alpha.shape[:2]
        a = rng.uniform(0, 2 * math.pi)
        ramp = (np.arange(pw, dtype=np.float32)[None, :] * math.cos(a)
                + np.arange(ph, dtype=np.float32)[:, None] * math.sin(a)) / max(ph, pw)  # [ph, pw] in [-1.4, 1.4]
        fill = colour * (1 + rng.uniform(-0.15, 0.15) * ramp[..., None])
        if rng.uniform() < s.outline_fraction:
            m = (mask >= 128).astype(np.uint8)
            thick = 1 if max(mask.shape) < 40 else 2
            edge = (m - cv2.erode(m, np.ones((3, 3), np.uint8), iterations=thick))[patch_sl].astype(bool)
            fill[edge] = colour * 0.45
        region[:] = region * (1 - alpha) + fill * alpha
        clipped = np.array([max(full[0], 0), max(full[1], 0), min(full[2], w), min(full[3], h)], np.float32)
        truncated = not np.array_equal(clipped, full)
        small = max(clipped[2] - clipped[0], clipped[3] - clipped[1]) < s.difficult_below
        objects.append(SynthObject(name, clipped, truncated, bool(small), occ))

    sigma = rng.uniform(*s.noise_sigma)
    img += rng.normal(0, sigma, (h, w, 1)).astype(np.float32)  # grey noise, like sensor grain
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), objects, dropped
