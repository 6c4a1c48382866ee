"""The SPP feature engine: backbones, scales, projection onto conv5, the conv5 cache, R-CNN mode."""
from spp_det.features.backbones import Backbone
from spp_det.features.cache import FeatureCache
from spp_det.features.projection import project_windows
from spp_det.features.rcnn import rcnn_features
from spp_det.features.scales import best_scale, scaled_sizes

__all__ = ["Backbone", "FeatureCache", "project_windows", "rcnn_features", "best_scale",
           "scaled_sizes"]
