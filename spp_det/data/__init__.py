"""Datasets in VOC layout, image reading, the synthetic dataset."""
from spp_det.data.images import ImageError, read_image
from spp_det.data.voc import ImageRecord, load_split

__all__ = ["ImageError", "read_image", "ImageRecord", "load_split"]
