"""Published Pascal VOC 2007 test numbers printed beside an evaluation of the 20 VOC classes.

Only numbers that could be checked against their source are here (each row's mean equals the mean
the paper states, to 0.1):

* SPP-net's own per-class row (its VOC 2007 comparison table, Table 11 in the TPAMI version) could
  not be sourced in a checkable form, so only its stated means appear: 59.2 (ZF-5, 5 scales,
  fine-tuned fc7, box regression) and 58.0 (one scale, 688).
* That table also reprints R-CNN's per-class row "as reported in" the R-CNN paper (Girshick et al.,
  CVPR 2014, Table 1, "R-CNN FT fc7 BB", AlexNet): mAP 58.5. It is the per-class reference here.

Both are on the full VOC 2007 test set (4,952 images) after training on all 5,011 trainval images:
an evaluation on a subset is not the same benchmark.
"""
from __future__ import annotations

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# R-CNN FT fc7 BB (AlexNet), VOC 2007 test AP in percent (R-CNN paper Table 1; SPP-net Table 11): mean 58.5
RCNN_FC7_BB = dict(zip(VOC_CLASSES, (68.1, 72.8, 56.8, 43.0, 36.8, 66.3, 74.2, 67.6, 34.4, 63.5, 54.5, 61.2, 69.1,
                                     68.6, 58.7, 33.4, 62.9, 51.1, 62.5, 64.8)))
RCNN_NAME = "R-CNN ftfc7 bb (AlexNet)"
SPP_MAP = {"SPP-net ZF-5, 5 scales, ftfc7 bb": 59.2, "SPP-net ZF-5, 1 scale": 58.0}


def column(classes) -> list[float] | None:
    """R-CNN's AP07 for each of ``classes`` in order, then their mean: the column printed beside an
    evaluation; None unless the classes are VOC's 20 (the references are per VOC class)."""
    if tuple(classes) != VOC_CLASSES:
        return None
    values = [RCNN_FC7_BB[name] for name in classes]
    return [*values, sum(values) / len(values)]


def note() -> str:
    """One line naming the reference columns and the SPP-net means."""
    spp = ", ".join(f"{name} {value:.1f}" for name, value in SPP_MAP.items())
    return (f"R-CNN: {RCNN_NAME} on the full VOC 2007 test set, as in SPP-net's comparison table (TPAMI "
            f"Table 11); SPP-net's own per-class row is not reproduced here, its means: {spp}")
