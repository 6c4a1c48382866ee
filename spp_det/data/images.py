"""Reading images into RGB ``uint8 [H, W, 3]`` whatever the file holds.

Grayscale, palette, alpha, 16-bit and CMYK images are converted, EXIF orientation is applied,
and every failure is an ``ImageError`` naming the file and the reason, so a caller processing a
folder can report the file and go on.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spp_det.errors import UserError

# Pillow's own decompression-bomb limit (about 89.5 megapixels) unless the caller gives one.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(UserError):
    """An image that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``path`` as RGB ``uint8 Array[H, W, 3]`` with EXIF orientation applied.

    Raises ``ImageError`` for a missing, empty, truncated or unreadable file, or one with more
    than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(path, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()  # decodes now, so a truncated file fails here
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from None


# EXIF orientations that turn the picture a quarter (transpose, rotate 90/270, transverse): its
# displayed width and height are the stored ones swapped (Pillow's ImageOps.exif_transpose).
QUARTER_TURNS = (5, 6, 7, 8)


def image_size(path: str | Path) -> tuple[int, int, int]:
    """``(width, height, orientation)`` of the image as displayed (EXIF orientation applied, as
    ``read_image`` returns it), from the header alone; ``orientation`` is the EXIF tag (1: none).
    Raises ``ImageError`` when the header cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = int(img.getexif().get(0x0112, 1) or 1)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise ImageError(path, f"cannot read the image header ({type(exc).__name__}: {exc})") from None
    return (height, width, orientation) if orientation in QUARTER_TURNS else (width, height, orientation)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 array. 16-bit and float images are rescaled to 0..255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so transparent regions do not become black shapes.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def list_images(source: str | Path) -> list[Path]:
    """Image files under ``source`` (recursive, sorted), or ``[source]`` for a single file."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such file or folder")
    return sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
