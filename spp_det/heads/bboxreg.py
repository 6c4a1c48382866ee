"""Per-class box regression on pool5 features (R-CNN appendix C, ``rcnn_train_bbox_regressor.m``).

The targets are ``spp_det.boxes.encode_deltas`` of a proposal ``P`` and its ground-truth box ``G``
(centre and size, internal continuous boxes), ``apply_deltas`` their inverse::

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

import torch

from spp_det.boxes import encode_deltas

# R-CNN whitens the targets with eigenvalues + 0.001 (rcnn_train_bbox_regressor.m)
WHITEN_EPS = 1e-3


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
    y = encode_deltas(proposals, gt).double()  # [N, 4]
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
