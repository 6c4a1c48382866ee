"""Per-class box regression on pool5 features (R-CNN appendix C, ``rcnn_train_bbox_regressor.m``).

A proposal ``P`` and its ground-truth box ``G`` are parameterised by centre and size, with the
internal continuous boxes (no "+1"): ``w = x2 - x1``, ``cx = x1 + w / 2`` (same for y). Targets::

    t = ((Gx - Px) / Pw, (Gy - Py) / Ph, log(Gw / Pw), log(Gh / Ph))

Per class, ridge regression from ``[x, 1]`` (pool5, scaled by one global factor like the SVM
features; R-CNN scales pool5 to mean norm 20 as well, which is what lambda = 1000 is tuned for)
to the targets. As in R-CNN, the targets are first centred by their mean and whitened by
``T = V diag(1 / sqrt(eig + 0.001)) V^T`` of their covariance, the ridge penalty ``lambda``
applies to every coefficient including the bias column (``solve_robust``'s
``(A^T A + lambda I) \\ A^T y``), and predictions are mapped back with ``T^-1`` and the mean.
Here that back-mapping is folded into the stored weights, so a regressor is one matrix
``W [D + 1, 4]`` and ``deltas = [x, 1] @ W``.
"""
from __future__ import annotations

import numpy as np
import torch

# R-CNN whitens the targets with eigenvalues + 0.001 (rcnn_train_bbox_regressor.m)
WHITEN_EPS = 1e-3
# log-size deltas above this are clamped at test time so exp() cannot overflow (torchvision's
# BoxCoder uses log(1000 / 16) for the same reason)
MAX_LOG_DELTA = float(np.log(1000.0 / 16))


def _size_centre(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return w, h, boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h


def encode(proposals: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Targets of ``gt`` ``[N, 4]`` relative to ``proposals`` ``[N, 4]`` -> ``[N, 4]`` (dx, dy, dw, dh)."""
    pw, ph, px, py = _size_centre(proposals.double())
    gw, gh, gx, gy = _size_centre(gt.double())
    pw, ph = pw.clamp(min=eps), ph.clamp(min=eps)
    return torch.stack([(gx - px) / pw, (gy - py) / ph,
                        torch.log(gw.clamp(min=eps) / pw), torch.log(gh.clamp(min=eps) / ph)], dim=1).to(proposals.dtype)


def apply(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Move ``boxes`` ``[N, 4]`` by ``deltas`` ``[N, 4]`` or ``[N, K, 4]`` -> boxes of the same shape
    as ``deltas`` (the inverse of ``encode``)."""
    dtype = boxes.dtype
    boxes, deltas = boxes.double(), deltas.double()
    pw, ph, px, py = _size_centre(boxes)
    if deltas.dim() == 3:  # [N, K, 4]: broadcast the windows over the classes
        pw, ph, px, py = (v[:, None] for v in (pw, ph, px, py))
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw, dh = deltas[..., 2].clamp(max=MAX_LOG_DELTA), deltas[..., 3].clamp(max=MAX_LOG_DELTA)
    cx, cy = px + dx * pw, py + dy * ph
    w, h = pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1).to(dtype)


def apply_in_image(boxes: torch.Tensor, deltas: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``apply`` then clipped to the image ``width x height`` (R-CNN clips too): test time's boxes
    ``[N, K, 4]``, the same for both runtimes (``spp_det.detection``)."""
    moved = apply(boxes, deltas)
    moved[..., 0::2] = moved[..., 0::2].clamp(0, width)
    moved[..., 1::2] = moved[..., 1::2].clamp(0, height)
    return moved


def ridge(features: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_W ||A W - Y||^2 + lam ||W||^2`` with ``A = [features, 1]`` ``[N, D + 1]``,
    ``Y = targets`` ``[N, T]`` -> ``W`` ``[D + 1, T]`` float32.

    Solved by Cholesky in whichever of the primal (``(A^T A + lam I) W = A^T Y``, size D + 1) or the
    dual (``W = A^T (A A^T + lam I)^-1 Y``, size N) is smaller; float64 when that matrix takes
    under 1 GiB, else float32 (pool5 of ZF-5 is 12,800-d: its Gram matrix is 1.3 GB in float64).
    """
    n, d = features.shape
    m = min(n, d + 1)
    dtype = torch.float64 if m * m * 8 < (1 << 30) else torch.float32
    a = torch.cat([features.to(dtype), torch.ones(n, 1, dtype=dtype, device=features.device)], dim=1)
    y = targets.to(dtype).to(features.device)
    eye = torch.eye(m, dtype=dtype, device=features.device)
    if n < d + 1:  # dual
        chol = torch.linalg.cholesky(a @ a.T + lam * eye)
        w = a.T @ torch.cholesky_solve(y, chol)
    else:  # primal
        chol = torch.linalg.cholesky(a.T @ a + lam * eye)
        w = torch.cholesky_solve(a.T @ y, chol)
    return w.float()


def fit_regressor(features: torch.Tensor, proposals: torch.Tensor, gt: torch.Tensor, lam: float) -> torch.Tensor:
    """One class's regressor: ``features`` ``[N, D]`` (scaled pool5) of ``proposals`` ``[N, 4]``
    matched to ``gt`` ``[N, 4]`` -> ``W`` ``[D + 1, 4]`` with ``deltas = [x, 1] @ W``.

    Targets are centred and whitened as in R-CNN before the ridge solve; the inverse whitening
    and the mean are folded into ``W``.
    """
    y = encode(proposals, gt).double()  # [N, 4]
    mu = y.mean(dim=0)
    yc = y - mu
    cov = yc.T @ yc / max(len(y) - 1, 1)  # [4, 4], MATLAB's cov (N - 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0) + WHITEN_EPS
    whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    unwhiten = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    beta = ridge(features, (yc @ whiten), lam).double()  # [D + 1, 4] in the whitened space
    w = beta @ unwhiten.to(beta.device)
    w[-1] += mu.to(w.device)  # the bias row carries the mean back
    return w.float().cpu()


def predict(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Deltas of every window for every class: ``features`` ``[N, D]`` (scaled pool5),
    ``weight`` ``[K, D + 1, 4]`` -> ``[N, K, 4]``."""
    weight = weight.to(features.device, features.dtype)
    deltas = torch.einsum("nd,kdt->nkt", features, weight[:, :-1])  # [N, K, 4]
    return deltas + weight[:, -1][None]  # + bias row [1, K, 4]
