"""The synthetic dataset in exact VOC layout: ``spp-det synth data.root=DIR``.

A small but honest test of a detector (issue 2, item 6): classes differ by **shape** only
(circle, triangle, square, star, cross, ring; colours are random per instance), drawn at random
rotations and sizes (``min_object`` px to ``max_object_frac`` of the shorter side) on textured
backgrounds (gradients, stripes, low-frequency blobs, noise) with distractor shapes that belong
to no class by construction (elongated ellipses, straight lines, open arcs, zigzags: nothing
round, square or star-like). Objects occlude each other (later ones are drawn over earlier
ones; a box is the full object extent), cross image borders (box clipped, ``<truncated>1``),
and tiny ones are ``<difficult>1``.

Layout written under ``root`` (``spp_det.data.voc.find_voc_dir`` accepts ``root`` itself)::

    JPEGImages/<id>.jpg  Annotations/<id>.xml
    ImageSets/Main/{train,val,test,trainval}.txt  ImageSets/Main/<class>_<split>.txt
    ImageSets/Main/pretrain.txt  (with pretrain_images > 0: extra images, ids after the first
                                  num_images, for backbone pretraining; the demo's ImageNet)
    synth_summary.json   (settings and counts)

Boxes: internally ``x1, y1, x2, y2`` 0-based continuous; a rasterised object covering pixel
columns ``c0..c1`` has ``x1 = c0, x2 = c1 + 1``, which VOC stores as ``xmin = c0 + 1,
xmax = c1 + 1`` (1-based inclusive), converted once by ``spp_det.boxes.internal_to_voc``.

Deterministic: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so the same
seed gives byte-identical files.

This module writes the files; ``spp_det.data.synth_draw`` holds the settings and draws the images.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
from tqdm import tqdm

from spp_det.boxes import internal_to_voc
from spp_det.data.synth_draw import SHAPES, SPLITS, SynthObject, SynthSettings, draw_image
from spp_det.errors import UserError

log = logging.getLogger(__name__)

PRETRAIN_SPLIT = "pretrain"  # pretrain_images extra images for backbone pretraining (the demo's stand-in for ImageNet)
# What the generator writes into root (and, with overwrite=true, replaces; nothing else is touched).
MANAGED = ("ImageSets", "Annotations", "JPEGImages", "synth_summary.json")
PARTIAL_PREFIX = ".spp-det-synth-partial-"


# --------------------------------------------------------------------------------------------
# VOC files


def annotation_xml(image_id: str, width: int, height: int, objects: list[SynthObject]) -> str:
    """The VOC 2007 XML text of one image (boxes converted to 1-based inclusive pixels)."""
    lines = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>spp-det synthetic shapes</database>",
        "\t\t<annotation>spp-det synth</annotation>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    voc = internal_to_voc(np.stack([o.box for o in objects])) if objects else np.zeros((0, 4))
    for obj, (xmin, ymin, xmax, ymax) in zip(objects, voc):
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(obj.name)}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{int(round(xmin))}</xmin>",
            f"\t\t\t<ymin>{int(round(ymin))}</ymin>",
            f"\t\t\t<xmax>{int(round(xmax))}</xmax>",
            f"\t\t\t<ymax>{int(round(ymax))}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def split_counts(num_images: int, fractions: tuple[tuple[str, float], ...]) -> dict[str, int]:
    """Images per split by largest remainder; every split with a positive fraction gets at least
    one image when there are enough images."""
    total = sum(f for _, f in fractions)
    exact = {name: num_images * f / total for name, f in fractions}
    counts = {name: int(math.floor(v)) for name, v in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: num_images - sum(counts.values())]:
        counts[name] += 1
    for name, f in fractions:
        if f > 0 and counts[name] == 0:
            donor = max(counts, key=counts.get)
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[name] += 1
    return counts


def _check_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: data.root is a file, not a folder")
    if not root.is_dir():
        return
    stale = [p for p in root.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    others = sorted(p.name for p in root.iterdir() if not p.name.startswith(PARTIAL_PREFIX))
    if others and not overwrite:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise UserError(f"{root}: folder is not empty ({shown}); choose an empty or new data.root, "
                        f"or set synth.overwrite=true to replace {', '.join(MANAGED)} there")
    for p in stale:  # left by an interrupted run of this generator (only our own prefix)
        log.warning("%s: removing the leftover of an interrupted synth run", p)
        shutil.rmtree(p, ignore_errors=True)


def assign_splits(s: SynthSettings) -> tuple[list[str], dict[str, str], tuple[str, ...]]:
    """Image ids, the split of each id, and the splits written (with ``pretrain`` when there are
    extra pretraining images). The first ``num_images`` ids are split at random (seeded); the
    extra ones after them (which stay the same whatever ``pretrain_images`` is) go to ``pretrain``."""
    counts = split_counts(s.num_images, s.fractions)
    ids = [f"{i + 1:06d}" for i in range(s.num_images + s.pretrain_images)]
    order = np.random.default_rng([s.seed, 1 << 30]).permutation(s.num_images)
    split_of, k = {}, 0
    for name in SPLITS:
        for j in order[k: k + counts.get(name, 0)]:
            split_of[ids[j]] = name
        k += counts.get(name, 0)
    splits = SPLITS + ((PRETRAIN_SPLIT,) if s.pretrain_images else ())
    for image_id in ids[s.num_images:]:
        split_of[image_id] = PRETRAIN_SPLIT
    return ids, split_of, splits


def write_image(folder: Path, image_id: str, image: np.ndarray, objects: list, jpeg_quality: int) -> None:
    """``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml`` of one drawn image under ``folder``."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode image {image_id} as JPEG")
    (folder / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg.tobytes())
    h, w = image.shape[:2]
    (folder / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, w, h, objects))


def count_image(summary: dict, present: dict, image_id: str, split: str | None, objects: list, dropped: int) -> None:
    """Add one image's objects to ``summary`` (see ``write_synthetic``) and to ``present`` (per split,
    per class: image id -> 1 with a non-difficult object of the class, 0 with difficult ones only)."""
    for key in ([split, "total"] + (["trainval"] if split in ("train", "val") else [])) if split else ["total"]:
        summary["images"][key] += 1
        summary["objects"][key] += len(objects)
        summary["difficult"][key] += sum(o.difficult for o in objects)
        summary["truncated"][key] += sum(o.truncated for o in objects)
    summary["occluded"] += sum(o.occluded for o in objects)
    summary["dropped_occluded"] += dropped
    for o in objects:
        pc = summary["per_class"][o.name]
        pc["objects"] += 1
        pc["difficult"] += int(o.difficult)
        pc["truncated"] += int(o.truncated)
        if split:
            seen = present[split][o.name]
            seen[image_id] = max(seen.get(image_id, 0), 0 if o.difficult else 1)


def write_split_lists(main: Path, ids: list[str], split_of: dict[str, str], splits: tuple[str, ...],
                      classes: list[str], present: dict) -> None:
    """``ImageSets/Main/<split>.txt`` (and ``trainval``) and the devkit's per-class lists
    ``<class>_<split>.txt``: 1 present, -1 absent, 0 only difficult."""
    split_ids = {sp: sorted(i for i in ids if split_of.get(i) == sp) for sp in splits}
    split_ids["trainval"] = sorted(split_ids["train"] + split_ids["val"])
    present["trainval"] = {c: {**present["train"][c], **present["val"][c]} for c in classes}
    for sp, members in split_ids.items():
        (main / f"{sp}.txt").write_text("".join(f"{i}\n" for i in members))
        for c in classes:
            labels = present[sp][c]
            (main / f"{c}_{sp}.txt").write_text("".join(f"{i} {labels.get(i, -1):2d}\n" for i in members))


def move_into_place(partial: Path, root: Path) -> None:
    """Replace ``root``'s dataset by the one written in ``partial``; ImageSets (what makes the
    folder look like a dataset) goes out first and comes in last."""
    order_out = ("ImageSets", "synth_summary.json", "Annotations", "JPEGImages")
    trash = partial / "old"
    trash.mkdir()
    for name in order_out:
        if (root / name).exists() or (root / name).is_symlink():
            os.replace(root / name, trash / name)
    for name in reversed(order_out):
        os.replace(partial / name, root / name)


def write_synthetic(root: str | Path, synth_cfg, classes: list[str] | tuple[str, ...], progress: bool = True) -> dict:
    """Write the synthetic dataset into ``root`` (VOC layout, see the module docstring).

    ``synth_cfg``: the ``synth`` config group (its ``SynthSettings``, a DictConfig or dict); ``classes``: shape names
    from ``SHAPES`` (the dataset's classes, in label order). Refuses a non-empty ``root`` unless
    ``synth_cfg.overwrite``. Everything is written into ``root/.spp-det-synth-partial-*`` first
    and moved into place at the end (split files last), so an interrupted run never leaves a
    dataset that looks complete.

    Returns the summary: ``{"root", "seed", "classes", "images": {split: n, "trainval", "total"},
    "objects" / "difficult" / "truncated": {split: n, "trainval", "total"}, "occluded": n,
    "dropped_occluded": n, "per_class": {class: {"objects", "difficult", "truncated"}},
    "seconds": float}``.
    """
    s = synth_cfg if isinstance(synth_cfg, SynthSettings) else SynthSettings.from_cfg(synth_cfg)
    classes = list(classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise UserError(f"synth.classes: {classes} must be distinct shape names from {list(SHAPES)} "
                        f"(unknown: {unknown})")
    root = Path(root)
    _check_root(root, s.overwrite)
    start = time.perf_counter()
    ids, split_of, splits = assign_splits(s)

    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=root))
    try:
        (partial / "JPEGImages").mkdir()
        (partial / "Annotations").mkdir()
        main = partial / "ImageSets" / "Main"
        main.mkdir(parents=True)
        zero = lambda: {**{n: 0 for n in splits}, "trainval": 0, "total": 0}  # noqa: E731
        summary = {
            "root": str(root), "seed": s.seed, "classes": classes,
            "images": zero(), "objects": zero(), "difficult": zero(), "truncated": zero(),
            "occluded": 0, "dropped_occluded": 0,
            "per_class": {c: {"objects": 0, "difficult": 0, "truncated": 0} for c in classes},
        }
        present: dict[str, dict[str, dict[str, int]]] = {sp: {c: {} for c in classes} for sp in splits}
        for i, image_id in enumerate(tqdm(ids, desc="synth", unit="img", disable=not progress)):
            image, objects, dropped = draw_image(s.seed, i, s, classes)
            write_image(partial, image_id, image, objects, s.jpeg_quality)
            count_image(summary, present, image_id, split_of.get(image_id), objects, dropped)
        write_split_lists(main, ids, split_of, splits, classes, present)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "overwrite"}
        settings["fractions"] = dict(s.fractions)
        (partial / "synth_summary.json").write_text(json.dumps({"settings": settings, **summary}, indent=2) + "\n")
        move_into_place(partial, root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table (images, objects, difficult, truncated per split and class)."""
    cols = [*(c for c in summary["images"] if c not in ("trainval", "total")), "trainval", "total"]
    rows = [f"{'':<12}" + "".join(f"{c:>10}" for c in cols)]
    for key in ("images", "objects", "difficult", "truncated"):
        rows.append(f"{key:<12}" + "".join(f"{summary[key][c]:>10}" for c in cols))
    rows += ["", f"{'class':<12}{'objects':>10}{'difficult':>10}{'truncated':>10}"]
    for name, pc in summary["per_class"].items():
        rows.append(f"{name:<12}{pc['objects']:>10}{pc['difficult']:>10}{pc['truncated']:>10}")
    rows += ["", f"partly occluded objects: {summary['occluded']}; left out as hidden by more than "
                 f"max_occlusion: {summary['dropped_occluded']}; {summary['seconds']:.1f} s"]
    return "\n".join(rows)
