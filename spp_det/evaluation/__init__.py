"""Evaluation: devkit-exact VOC AP, COCO-style numbers, VOC result files, PR plots, `spp-det eval`."""
from spp_det.evaluation.results import read_results, write_results
from spp_det.evaluation.voc_ap import VOCEvaluator, voc07_ap, voc10_ap

__all__ = ["VOCEvaluator", "voc07_ap", "voc10_ap", "read_results", "write_results"]
