"""Test-time detection: post-processing, the trained detector, drawing, `spp-det detect`.

``Detector`` (spp_det.detection.detector) is imported from its module, not here, so that
scoring result files never imports the model.
"""
from spp_det.detection.postprocess import Detections, postprocess

__all__ = ["Detections", "postprocess"]
