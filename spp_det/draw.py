"""Annotated copies of images: boxes, class names and scores, readable on any image size.

Shared by `spp-det detect` (annotated copies) and the evaluation report (example images), so
neither layer imports the other to draw."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spp_det.structures import Detections

# Distinct colours (Tableau 10), one per class in turn.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def style_for(width: int, height: int) -> tuple[int, int]:
    """Line width and font size (pixels) in proportion to the image: about 1/300 and 1/38 of
    the longer side, never below 1 px lines and 10 px text."""
    side = max(width, height)
    return max(1, round(side / 300)), max(10, round(side / 38))


def draw_boxes(canvas: Image.Image, boxes, colours, texts) -> Image.Image:
    """Draw each box of ``boxes`` ``[D, 4]`` (internal convention, pixels of ``canvas``) in its
    ``colours`` RGB with its ``texts`` label on a filled tag, in order (later ones on top), onto
    ``canvas`` (modified and returned)."""
    draw = ImageDraw.Draw(canvas)
    line, font_size = style_for(*canvas.size)
    font = ImageFont.load_default(size=font_size)
    for box, colour, text in zip(boxes, colours, texts):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(1, line)
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box, inside when at the top
        tx = min(max(x1, 0), max(canvas.width - tw - 2 * pad, 0))
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=(255, 255, 255), font=font)
    return canvas


def draw_detections(image: np.ndarray, detections: Detections, classes) -> Image.Image:
    """``image`` RGB ``uint8 [H, W, 3]`` -> a PIL copy with each detection drawn as a box and a
    ``"<class> <score>"`` label (``classes[label - 1]``). The input array is not modified."""
    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    order = np.argsort(detections.scores, kind="stable")  # most confident drawn last, on top
    labels = [int(detections.labels[i]) for i in order]
    return draw_boxes(canvas, detections.boxes[order], [PALETTE[(k - 1) % len(PALETTE)] for k in labels],
                      [f"{classes[k - 1]} {float(detections.scores[i]):.2f}" for k, i in zip(labels, order)])
