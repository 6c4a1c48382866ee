"""Test-time detection: post-processing, the trained detector, `spp-det detect`.

``Detector`` (spp_det.detection.detector) is imported from its module, not here, so that
scoring result files never imports the model.
"""
from spp_det.detection.postprocess import postprocess
from spp_det.structures import Detections

__all__ = ["Detections", "postprocess"]
