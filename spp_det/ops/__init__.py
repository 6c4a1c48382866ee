"""Tensor ops of SPP-net (like ``torchvision.ops``): spatial pyramid pooling."""
from spp_det.ops.spp import SpatialPyramidPool, bin_edges, pyramid_dim, spatial_pyramid_pool

__all__ = ["SpatialPyramidPool", "bin_edges", "pyramid_dim", "spatial_pyramid_pool"]
