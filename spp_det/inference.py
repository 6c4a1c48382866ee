"""Test-time speed without retraining: reduced precision and truncated-SVD fc layers.

Both change a trained ``SPPNet`` for ``eval`` / ``detect`` / ``bench`` only; the stored model
(``model.pt``) stays the paper's fp32 network.

* ``precision`` (``eval.precision``):
  - ``fp32``: the paper's arithmetic;
  - ``bf16``: conv5 and fc6/fc7 under ``torch.autocast`` in bfloat16 (CPU with AVX-512 BF16 or
    AMX, and CUDA); pyramid pooling takes the max of the bf16 maps exactly; SVM scores and box
    regression stay fp32 (they read ``.float()`` features);
  - ``int8``: fc6/fc7 as dynamically quantised int8 linear layers (weights int8 per tensor,
    activations quantised per batch), CPU only; conv5 stays fp32 (int8 convolutions need static
    calibration, which a detector trained without it does not have).
* ``fc_rank`` (``eval.fc_rank``): Fast R-CNN's truncated SVD (Girshick 2015, Sec. 3.1): an fc
  layer ``W`` (``out x in``) becomes ``W ~ U_t S_t V_t^T``: a layer ``S_t V_t^T`` (``t x in``, no
  bias) followed by ``U_t`` (``out x t``, the original bias), ``t (in + out)`` multiply-adds per
  window instead of ``in * out``. Fast R-CNN: fc6 rank 1024, fc7 rank 256 on VGG-16, -0.3 mAP.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from spp_det.errors import UserError
from spp_det.settings import PRECISIONS


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``nn.Linear(in, out)`` -> ``Sequential(Linear(in, rank, bias=False), Linear(rank, out))``, the best
    rank-``rank`` approximation of its weight in the Frobenius norm (Eckart-Young)."""
    out_dim, in_dim = layer.weight.shape
    if not 0 < rank < min(out_dim, in_dim):
        raise UserError(f"fc_rank {rank} must lie between 1 and {min(out_dim, in_dim) - 1} for a "
                        f"{in_dim} -> {out_dim} layer (at full rank the SVD saves nothing)")
    weight = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # [out, r], [r], [r, in]
    first, second = nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])
        second.weight.copy_(u[:, :rank])
        second.bias.copy_(layer.bias.detach() if layer.bias is not None else torch.zeros(out_dim))
    return nn.Sequential(first, second).to(layer.weight.device, layer.weight.dtype)


def compress_fc(model, ranks: Sequence[int | None] | None):
    """Replace ``model.head.fc6`` / ``fc7`` by their truncated SVDs at ``ranks`` (``[fc6, fc7]``; a
    ``None`` rank keeps that layer). Returns ``model`` (changed in place)."""
    if not ranks:
        return model
    ranks = list(ranks)
    if len(ranks) != 2:
        raise UserError(f"fc_rank must be [fc6_rank, fc7_rank] (null keeps a layer), got {ranks}")
    for name, rank in zip(("fc6", "fc7"), ranks):
        if rank is not None:
            setattr(model.head, name, truncated_svd(getattr(model.head, name), int(rank)))
    return model


def set_precision(model, precision: str) -> Callable[[], ContextManager]:
    """Prepare ``model`` (an ``SPPNet`` in eval mode) for ``precision`` and return a factory of the
    context that conv5 and fc6/fc7 must run in (``with autocast(): ...``)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = model.device.type
    if precision == "bf16":
        return lambda: torch.autocast(device, dtype=torch.bfloat16)
    if precision == "int8":
        if device != "cpu":
            raise UserError("precision=int8 (dynamic quantisation of fc6/fc7) runs on the CPU only; "
                            "use precision=bf16 on CUDA")
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, which
            warnings.simplefilter("ignore")  # is not pinned here; the eager API still works in torch 2.14
            model.head = quantize_dynamic(model.head, {nn.Linear}, dtype=torch.qint8)
    return contextlib.nullcontext


__all__ = ["compress_fc", "set_precision", "truncated_svd"]
