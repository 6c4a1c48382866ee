"""SPP-net's network (``sppnet``: tensors only, no file I/O) and how it is built with its weights
(``build``: the one place weights are loaded or left out)."""
from spp_det.model.build import (backbone_source, build_finetune_model, build_model, describe_backbone,
                                 init_from_scratch, load_backbone_checkpoint, load_finetuned_model,
                                 pretrain_configured, require_trained_backbone, without_weights)
from spp_det.model.sppnet import FCHead, SPPNet, new_fc8

__all__ = ["FCHead", "SPPNet", "backbone_source", "build_finetune_model", "build_model", "describe_backbone",
           "init_from_scratch", "load_backbone_checkpoint", "load_finetuned_model", "new_fc8", "pretrain_configured",
           "require_trained_backbone", "without_weights"]
