"""SPP-net's network (``sppnet``: tensors only, no file I/O), how it is built from the ``model``
group (``build``) and where its weights come from (``weights``: the one place they are loaded)."""
from spp_det.model.build import at_scales, build_model, init_from_scratch, without_weights
from spp_det.model.sppnet import FCClassifier, FCHead, SPPClassifier, SPPNet, new_fc8

__all__ = ["FCClassifier", "FCHead", "SPPClassifier", "SPPNet", "at_scales", "build_model", "init_from_scratch", "new_fc8",
           "without_weights"]
