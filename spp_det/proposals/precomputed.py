"""Precomputed proposals: R-CNN / Fast R-CNN selective-search ``.mat`` files and this project's schema.

**R-CNN / Fast R-CNN ``.mat``** (e.g. ``voc_2007_trainval.mat`` from the Fast R-CNN release):
``boxes`` is a cell array with one ``[N_i, 4]`` matrix per image in MATLAB's 1-based inclusive
pixels, columns ``y1 x1 y2 x2``; ``images`` lists the image ids in the same order.
Converted exactly like VOC boxes (``spp_det.boxes``): ``x1 = xmin - 1, y1 = ymin - 1,
x2 = xmax, y2 = ymax`` (0-based continuous).

**Project schema** (``.npz``, read with ``allow_pickle=False``), written by
``spp-det proposals proposals.export=FILE.npz``::

    ids     unicode  [M]      image ids
    counts  int64    [M]      boxes per image
    boxes   float32  [T, 4]   all boxes concatenated in ``ids`` order, T = counts.sum(),
                              internal convention: 0-based continuous x1, y1, x2, y2
    format  unicode  []       "spp-det-proposals-v1"

Read it back with ``numpy.load(path)``: image ``ids[i]`` owns
``boxes[offsets[i]:offsets[i] + counts[i]]`` with ``offsets = concatenate([[0], cumsum(counts)[:-1]])``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from spp_det.errors import UserError
from spp_det.io import atomic_path

SCHEMA_FORMAT = "spp-det-proposals-v1"


class ProposalFileError(UserError):
    """A precomputed proposals file that cannot be used; the message says what was expected."""


def _check_boxes(boxes: np.ndarray, path: Path, image_id: str, what: str) -> None:
    """Refuse boxes whose right/bottom edge lies before the left/top one (a wrong column order)."""
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(
            f"{path}: image {image_id!r}: {int(bad.sum())} of {len(boxes)} boxes have x2 < x1 or y2 < y1 "
            f"(first: row {i} = {boxes[i].tolist()}); expected {what}")


def read_mat(path: str | Path) -> dict[str, np.ndarray]:
    """R-CNN selective-search ``.mat`` -> ``{image_id: float32 [N, 4]}`` internal boxes."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ProposalFileError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it with "
                                "save(..., '-v7') in MATLAB") from None
    except (ValueError, OSError, TypeError) as exc:
        raise ProposalFileError(f"{path}: cannot read as a MATLAB .mat file ({exc})") from None
    for key in ("boxes", "images"):
        if key not in mat:
            raise ProposalFileError(f"{path}: no variable {key!r}; expected R-CNN's selective-search layout: "
                                    "'boxes' (cell array, one [N,4] y1 x1 y2 x2 1-based matrix per image) and 'images' (ids)")
    cells = np.asarray(mat["boxes"]).ravel()
    ids = [_mat_string(x) for x in np.asarray(mat["images"]).ravel()]
    if len(cells) != len(ids):
        raise ProposalFileError(f"{path}: 'boxes' has {len(cells)} cells but 'images' has {len(ids)} ids; expected one cell per image")
    expected = "R-CNN order y1 x1 y2 x2, 1-based inclusive pixels (x2 >= x1, y2 >= y1)"
    out = {}
    for image_id, cell in zip(ids, cells):
        raw = np.asarray(cell, dtype=np.float64)
        if raw.size == 0:
            out[image_id] = np.zeros((0, 4), np.float32)
            continue
        if raw.ndim != 2 or raw.shape[1] != 4:
            raise ProposalFileError(f"{path}: image {image_id!r}: boxes have shape {list(raw.shape)}; expected [N, 4] in {expected}")
        _check_boxes(raw[:, [1, 0, 3, 2]], path, image_id, expected)
        xmin, ymin, xmax, ymax = raw[:, 1], raw[:, 0], raw[:, 3], raw[:, 2]
        # VOC-style 1-based inclusive -> internal 0-based continuous (spp_det/boxes.py).
        out[image_id] = np.stack([xmin - 1, ymin - 1, xmax, ymax], axis=1).astype(np.float32)
    return out


def _mat_string(value) -> str:
    """An id from a MATLAB cell/char array (scipy wraps strings in nested object arrays)."""
    while isinstance(value, np.ndarray):
        if value.dtype.kind in "US":
            return "".join(np.asarray(value).ravel().astype(str).tolist()).strip()
        value = value.ravel()[0] if value.size else ""
    return str(value).strip()


def read_schema(path: str | Path) -> dict[str, np.ndarray]:
    """Project schema ``.npz`` -> ``{image_id: float32 [N, 4]}`` (see the module docstring)."""
    path = Path(path)
    layout = "'ids' unicode [M], 'counts' int64 [M], 'boxes' float32 [sum(counts), 4] (0-based x1 y1 x2 y2)"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise ProposalFileError(f"{path}: cannot read as the spp-det proposals .npz schema ({exc}); expected {layout}") from None
    missing = [k for k in ("ids", "counts", "boxes") if k not in arrays]
    if missing:
        raise ProposalFileError(f"{path}: missing {', '.join(missing)}; expected {layout}")
    ids, counts, boxes = arrays["ids"].astype(str).ravel(), arrays["counts"].ravel(), arrays["boxes"]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalFileError(f"{path}: 'boxes' has shape {list(boxes.shape)}; expected {layout}")
    if len(counts) != len(ids) or (counts < 0).any() or int(counts.sum()) != len(boxes):
        raise ProposalFileError(f"{path}: {len(ids)} ids, {len(counts)} counts summing to {int(counts.sum())}, "
                                f"{len(boxes)} boxes; expected {layout}")
    out = {}
    start = 0
    for image_id, n in zip(ids, counts.astype(np.int64)):
        b = boxes[start:start + n].astype(np.float32)
        _check_boxes(b, path, image_id, "internal order x1 y1 x2 y2 (x2 >= x1, y2 >= y1)")
        out[str(image_id)] = b
        start += n
    return out


def write_schema(path: str | Path, boxes_by_id: dict[str, np.ndarray]) -> Path:
    """Write ``{image_id: float32 [N, 4]}`` in the project schema, atomically. Returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"proposals.export={path}: the proposals schema is a .npz file; give a name ending in .npz")
    ids = list(boxes_by_id)
    arrays = [np.asarray(boxes_by_id[i], dtype=np.float32).reshape(-1, 4) for i in ids]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            ids=np.array(ids, dtype=str),
            counts=np.array([len(a) for a in arrays], dtype=np.int64),
            boxes=np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32),
            format=np.array(SCHEMA_FORMAT),
        )
    return path


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    p = Path(path)
    return read_mat(p) if p.suffix.lower() == ".mat" else read_schema(p)


def read_precomputed(path: str | Path | None) -> dict[str, np.ndarray]:
    """``proposals.file`` (a ``.mat`` or ``.npz``) -> ``{image_id: float32 [N, 4]}``, read once per process."""
    if not path:
        raise UserError("proposals.backend=precomputed needs proposals.file=PATH (an R-CNN .mat or a spp-det .npz)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"proposals.file={p}: file not found")
    if p.suffix.lower() not in (".mat", ".npz"):
        raise UserError(f"proposals.file={p}: expected an R-CNN selective-search .mat or a spp-det proposals .npz")
    st = p.stat()
    return _read_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def precomputed_boxes(path: str | Path | None, image_id: str) -> np.ndarray:
    """Boxes of ``image_id`` in ``proposals.file``; a missing id is a ``UserError`` naming it."""
    table = read_precomputed(path)
    if image_id not in table:
        raise ProposalFileError(f"proposals.file={path}: no boxes for image {image_id!r} "
                                f"(the file has {len(table)} images)")
    return table[image_id]
