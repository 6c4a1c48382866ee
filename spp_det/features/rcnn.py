"""R-CNN baseline mode: the same backbone and head run on every window separately.

Each window is dilated so that, once warped to ``input_size`` x ``input_size`` (224), it has
``context`` (16) pixels of image context on every side (R-CNN, Girshick et al. 2014, Sec. 2.1
and appendix A), then warped anisotropically by bilinear sampling (``torchvision.ops.roi_align``,
one sample per output pixel); samples falling outside the image read 0, the mean after
normalisation, as R-CNN pads with the mean. The warped crops go through the backbone in batches,
the pyramid pools each whole crop map (so pool5 has the same length as in SPP mode), then fc7.
This is the side-by-side speed reference: conv5 runs once per *window* instead of once per image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align


def context_windows(windows: Tensor, context: float = 16.0, input_size: int = 224) -> Tensor:
    """Dilate ``Tensor[K, 4]`` so the original window maps to ``[context, input_size - context]``."""
    if not 0 <= 2 * context < input_size:
        raise ValueError(f"rcnn_context={context} leaves no room in rcnn_input={input_size}")
    centre = (windows[:, :2] + windows[:, 2:]) / 2  # [K, 2]
    half = (windows[:, 2:] - windows[:, :2]).clamp(min=1.0) / 2 * (input_size / (input_size - 2 * context))
    return torch.cat([centre - half, centre + half], dim=1)


def warp_windows(model, image: np.ndarray, windows: Tensor, context: float = 16.0, input_size: int = 224) -> Tensor:
    """Normalised crops ``Tensor[K, 3, input_size, input_size]`` of the windows ``[K, 4]``."""
    x = model.backbone.normalize(image)  # [1, 3, H, W]
    boxes = context_windows(windows.to(x.device, torch.float32), context, input_size)
    rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
    return roi_align(x, rois, output_size=(input_size, input_size), spatial_scale=1.0, sampling_ratio=1,
                     aligned=True)


@torch.no_grad()
def rcnn_features(model, image: np.ndarray, windows, batch_size: int = 32, context: float = 16.0,
                  input_size: int = 224) -> tuple[Tensor, Tensor]:
    """``(pool5 [K, pool5_dim], fc7 [K, fc_dim])`` of an ``SPPNet``'s layers in R-CNN mode
    (eval mode, no gradients, on the model's device): shapes and dtype as ``model.features``."""
    was_training = model.training
    model.eval()
    try:
        windows = torch.as_tensor(np.asarray(windows, dtype=np.float32) if not torch.is_tensor(windows) else windows)
        windows = windows.reshape(-1, 4).float()
        pool5, fc7 = [], []
        for chunk in windows.split(batch_size):
            crops = warp_windows(model, image, chunk, context, input_size)
            fmap = model.backbone(crops)  # [B, C, h, w]
            B, _, h, w = fmap.shape
            cells = torch.tensor([[0, 0, w - 1, h - 1]], device=fmap.device).repeat(B, 1)
            cells = torch.cat([torch.arange(B, device=fmap.device)[:, None], cells], dim=1)  # whole crop map
            p5 = model.pyramid(fmap, cells)
            pool5.append(p5)
            fc7.append(model.fc7(p5))
        if not pool5:
            dtype = model.head.dtype
            return (torch.zeros((0, model.pool5_dim), device=model.device, dtype=dtype),
                    torch.zeros((0, model.head.out_dim), device=model.device, dtype=dtype))
        return torch.cat(pool5), torch.cat(fc7)
    finally:
        model.train(was_training)
