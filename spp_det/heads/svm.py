"""Per-class linear SVMs on fc7 features, trained with R-CNN's hard-negative mining.

The objective is liblinear's ``-s 3 -B B -w1 w1 -c C`` (L2-regularised, L1-loss (hinge) SVM
solved in the dual; R-CNN ``rcnn_train.m`` calls ``liblinear_train(y, X, '-w1 2 -c 1e-3 -s 3 -B 10')``):
with each sample augmented by a constant feature ``B`` (the bias multiplier), ``x' = [x, B]``,
``w' = [w, b']``::

    min_w'  0.5 ||w'||^2  +  C * sum_i c_i * max(0, 1 - y_i w'.x'_i),   c_i = w1 if y_i = +1 else 1

The score of a window is ``w.x + b`` with ``b = B * b'``, so the bias *is* regularised, by
``0.5 (b / B)^2`` (the larger B, the weaker). Two solvers reach this objective:

- ``liblinear``: scikit-learn's ``LinearSVC(loss="hinge", dual=True)``, which is liblinear's
  dual coordinate descent (``-s 3``) with ``class_weight`` = ``-w1`` and ``intercept_scaling`` = ``-B``.
- ``torch``: accelerated projected gradient (FISTA with adaptive restart) on the same dual,
  ``max_a  sum_i a_i - 0.5 ||sum_i a_i y_i x'_i||^2``, ``0 <= a_i <= C c_i``. Each step is two
  matrix-vector products, so it runs on a GPU.

Both stop on liblinear's criterion for ``-s 3``: the dual's maximal violation (largest minus
smallest projected gradient) at most ``tol``. R-CNN passes no ``-e``, so liblinear's default for
``-s 3``, 0.1, is the paper's value (scikit-learn's own default, 1e-4, solves each of the many
retrainings of hard-negative mining 3-4x slower for no measured gain: docs/voc2007.md).

Hard-negative mining (R-CNN ``rcnn_train.m``, py-faster-rcnn ``tools/train_svms.py``):
``ClassSVM`` holds one class's positives and a cache of hard negatives. Images are streamed;
an image's negatives (IoU < 0.3 with every box of the class) scoring above ``hard_thresh`` are
added; once more than ``retrain_limit`` new ones have arrived the SVM is retrained, then cached
negatives scoring below ``evict_thresh`` are evicted. Until the first training the model scores
every window 0, so the first model is trained on the positives and the first image's negatives.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings

import numpy as np
import torch

from spp_det.errors import UserError

log = logging.getLogger(__name__)

SOLVERS = ("liblinear", "torch")


@dataclasses.dataclass(frozen=True)
class SVMSettings:
    """The SVM objective and the mining thresholds (``configs/svm/default.yaml``, R-CNN's values)."""

    C: float = 1e-3
    pos_weight: float = 2.0
    bias_multiplier: float = 10.0
    hard_thresh: float = -1.0001
    evict_thresh: float = -1.2
    retrain_limit: int = 2000
    solver: str = "liblinear"
    tol: float = 0.1           # dual maximal violation (liblinear -e; its default for -s 3, as R-CNN ran it)
    max_iter: int = 10000
    # the stage's (spp_det.stages.svm): feature scale, mining passes and negatives, flips, batch
    feature_norm: float = 20.0
    scale_images: int = 200
    scale_windows: int = 200
    neg_iou: float = 0.3
    epochs: int = 1
    flip: bool = False
    window_batch: int = 1000

    @classmethod
    def from_cfg(cls, svm_cfg) -> "SVMSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: svm_cfg[k] for k in fields if k in svm_cfg and svm_cfg[k] is not None}
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# objective and solvers


def svm_objective(w: torch.Tensor, b: float, x: torch.Tensor, y: torch.Tensor, settings: SVMSettings) -> float:
    """Primal objective of ``w`` ``[D]``, bias ``b`` (score units) on ``x`` ``[N, D]``, ``y`` ``[N]`` in {-1, +1}.

    ``0.5 ||w||^2 + 0.5 (b / B)^2 + C * sum_i c_i * hinge(y_i (w.x_i + b))`` (float64).
    """
    x = x.double()
    w = w.double().to(x.device)
    y = y.double().to(x.device)
    margins = y * (x @ w + b)  # [N]
    cost = torch.where(y > 0, settings.C * settings.pos_weight, settings.C)
    hinge = (cost * (1 - margins).clamp(min=0)).sum()
    return float(0.5 * w.dot(w) + 0.5 * (b / settings.bias_multiplier) ** 2 + hinge)


def _train_liblinear(x: torch.Tensor, y: torch.Tensor, s: SVMSettings) -> tuple[torch.Tensor, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    svc = LinearSVC(
        C=s.C, loss="hinge", dual=True, penalty="l2",
        class_weight={1: s.pos_weight, -1: 1.0},   # liblinear -w1
        fit_intercept=True, intercept_scaling=s.bias_multiplier,  # liblinear -B (the bias is regularised)
        tol=s.tol, max_iter=s.max_iter,
        random_state=0,  # liblinear shuffles its coordinates: unseeded, two identical runs give different SVMs
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x.cpu().numpy(), y.cpu().numpy().astype(np.int64))
    if any(issubclass(c.category, ConvergenceWarning) for c in caught):
        log.warning("liblinear did not converge in %d iterations (svm.max_iter); the model is still usable", s.max_iter)
    # sklearn orders classes [-1, 1], so coef_ scores the positive class
    return torch.from_numpy(svc.coef_[0].astype(np.float32)), float(svc.intercept_[0])


def max_violation(alpha: torch.Tensor, margins: torch.Tensor, upper: torch.Tensor) -> float:
    """liblinear's stopping measure for ``-s 3`` (``solve_l2r_l1l2_svc``): the spread of the
    projected gradient of the dual ``0.5 a'Qa - sum a`` over ``0 <= a <= upper``. The gradient is
    ``y_i w'.x'_i - 1`` (``margins - 1``); at a bound only the direction into the box counts."""
    grad = margins.double() - 1
    pg = torch.where(alpha <= 0, grad.clamp(max=0), torch.where(alpha >= upper, grad.clamp(min=0), grad))
    return float(pg.max() - pg.min())


def _train_torch(x: torch.Tensor, y: torch.Tensor, s: SVMSettings) -> tuple[torch.Tensor, float]:
    """FISTA on the dual of the ``-s 3`` problem; works on ``x``'s device, float32 matmuls with
    float64 bookkeeping of the objectives."""
    n, d = x.shape
    x = x.float()
    y = y.to(x.device).float()
    bias_feat = float(s.bias_multiplier)
    upper = torch.where(y > 0, s.C * s.pos_weight, s.C).float()  # box constraint U_i = C c_i

    def w_of(alpha):  # w' = sum_i a_i y_i x'_i  -> (w [D], b' scalar)
        ay = alpha * y
        return x.T @ ay, bias_feat * ay.sum()

    def margins_of(w, b):  # y_i w'.x'_i  [N]
        return y * (x @ w + bias_feat * b)

    # Lipschitz constant of the dual gradient: largest eigenvalue of Q = diag(y) X' X'^T diag(y),
    # i.e. ||X'||_2^2, by power iteration (a few percent above it is safe).
    v = torch.randn(d + 1, device=x.device, generator=None)
    v = v / v.norm()
    for _ in range(30):
        u = x @ v[:d] + bias_feat * v[d]
        v = torch.cat([x.T @ u, (bias_feat * u.sum()).reshape(1)])
        lip = float(v.norm())
        v = v / max(lip, 1e-30)
    step = 1.0 / (1.02 * lip + 1e-12)

    alpha = torch.zeros(n, device=x.device)
    z, t = alpha.clone(), 1.0
    w, b = w_of(alpha)
    for it in range(s.max_iter):
        wz, bz = w_of(z)
        grad = 1.0 - margins_of(wz, bz)  # gradient of the dual (to maximise) at z
        alpha_new = (z + step * grad).clamp_(min=torch.zeros_like(upper), max=upper)
        if float(grad.dot(alpha_new - alpha)) < 0:  # gradient restart (O'Donoghue & Candes 2015)
            t = 1.0
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = alpha_new + ((t - 1) / t_next) * (alpha_new - alpha)
        alpha, t = alpha_new, t_next
        if it % 10 == 9 and max_violation(alpha, margins_of(*w_of(alpha)), upper) <= s.tol:
            break
    else:
        log.warning("torch SVM solver stopped at svm.max_iter=%d before the dual violation reached svm.tol", s.max_iter)
    w, b = w_of(alpha)
    return w.float().cpu(), float(b) * bias_feat


def train_linear_svm(positives: torch.Tensor, negatives: torch.Tensor, settings: SVMSettings,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Train one SVM. ``positives`` ``[P, D]``, ``negatives`` ``[M, D]`` (scaled fc7) ->
    ``(w [D] float32 cpu, b float)``, score = ``x.w + b``."""
    if settings.solver not in SOLVERS:
        raise UserError(f"svm.solver must be one of {', '.join(SOLVERS)}, not {settings.solver!r}")
    x = torch.cat([positives.float(), negatives.float()])
    y = torch.cat([torch.ones(len(positives)), -torch.ones(len(negatives))])
    if settings.solver == "liblinear":
        return _train_liblinear(x.cpu(), y, settings)
    return _train_torch(x.to(device or "cpu"), y, settings)


# ---------------------------------------------------------------------------------------------
# feature scaling


def feature_scale(mean_norm: float, target_norm: float = 20.0) -> float:
    """One global factor so that features whose mean L2 norm is ``mean_norm`` get mean norm
    ``target_norm`` (R-CNN ``rcnn_feature_stats.m`` / ``rcnn_scale_features.m``; 20 there)."""
    if not mean_norm > 0:
        raise UserError(f"cannot scale features: their mean norm is {mean_norm} (all-zero fc7? check the fine-tuned model)")
    return float(target_norm) / float(mean_norm)


class NormMeter:
    """Running mean of L2 norms of feature rows (to compute ``feature_scale`` on a sample)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, features: torch.Tensor) -> None:
        if len(features):
            self.total += float(features.double().norm(dim=1).sum())
            self.count += len(features)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


# ---------------------------------------------------------------------------------------------
# hard-negative mining


class ClassSVM:
    """One class's SVM and its training cache: positives plus mined hard negatives.

    ``positives`` ``[P, D]`` scaled fc7 of the class's ground-truth boxes. Negatives arrive by
    ``offer``; ``keys`` (e.g. ``image_index * 100000 + window_index``) keep a window from being
    cached twice across mining epochs.
    """

    def __init__(self, name: str, positives: torch.Tensor, settings: SVMSettings,
                 device: torch.device | str | None = None) -> None:
        self.name = name
        self.settings = settings
        self.device = device
        self.positives = positives.float().cpu()
        dim = self.positives.shape[1]
        self.w = torch.zeros(dim)
        self.b = 0.0
        self.trained = False
        self.negatives = torch.zeros(0, dim)
        self.neg_keys = torch.zeros(0, dtype=torch.int64)
        self._pending: list[torch.Tensor] = []
        self._pending_keys: list[torch.Tensor] = []
        self.num_added = 0          # negatives added since the last training
        self.total_added = 0
        self.total_evicted = 0
        self.retrains = 0
        self.history: list[dict] = []

    # scores of the current model: x.w + b
    def score(self, features: torch.Tensor) -> torch.Tensor:
        return features.float().cpu() @ self.w + self.b

    @property
    def num_negatives(self) -> int:
        return len(self.negatives) + sum(len(p) for p in self._pending)

    def offer(self, features: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor | None = None) -> int:
        """Offer one image's negatives ``features`` ``[M, D]`` (scaled) with int64 ``keys`` ``[M]``;
        caches those scoring above ``hard_thresh`` (all of them before the first training, when
        every score is 0) and not already cached. ``scores`` may be passed when already computed.
        Returns how many were added."""
        if not len(features):
            return 0
        scores = self.score(features) if scores is None else scores.float().cpu()
        hard = scores > self.settings.hard_thresh
        keys = keys.cpu()
        if len(self.neg_keys) or self._pending_keys:
            cached = torch.cat([self.neg_keys, *self._pending_keys])
            hard &= ~torch.isin(keys, cached)
        if not bool(hard.any()):
            return 0
        self._pending.append(features[hard].float().cpu())
        self._pending_keys.append(keys[hard])
        added = int(hard.sum())
        self.num_added += added
        self.total_added += added
        return added

    def needs_training(self) -> bool:
        """R-CNN's rule: first time negatives are seen, or more than ``retrain_limit`` new ones."""
        has_negatives = self.num_negatives > 0
        return has_negatives and (not self.trained or self.num_added > self.settings.retrain_limit)

    def retrain(self) -> dict:
        """Train on positives + cached negatives, then evict the easy negatives (score <
        ``evict_thresh``). Returns the loss parts after training (R-CNN logs the same)."""
        if self._pending:
            self.negatives = torch.cat([self.negatives, *self._pending])
            self.neg_keys = torch.cat([self.neg_keys, *self._pending_keys])
            self._pending, self._pending_keys = [], []
        s = self.settings
        start = time.perf_counter()
        self.w, self.b = train_linear_svm(self.positives, self.negatives, s, self.device)
        self.trained = True
        self.retrains += 1
        self.num_added = 0
        z_pos, z_neg = self.score(self.positives), self.score(self.negatives)
        stats = {
            "pos_loss": s.C * s.pos_weight * float((1 - z_pos).clamp(min=0).sum()),
            "neg_loss": s.C * float((1 + z_neg).clamp(min=0).sum()),
            "reg_loss": 0.5 * float(self.w.double().dot(self.w.double())) + 0.5 * (self.b / s.bias_multiplier) ** 2,
            "positives": len(self.positives),
            "negatives": len(self.negatives),
            "seconds": time.perf_counter() - start,  # the solve and these scores (training curves)
        }
        stats["objective"] = stats["pos_loss"] + stats["neg_loss"] + stats["reg_loss"]
        easy = z_neg < s.evict_thresh
        stats["evicted"] = int(easy.sum())
        self.total_evicted += stats["evicted"]
        self.negatives, self.neg_keys = self.negatives[~easy], self.neg_keys[~easy]
        self.history.append(stats)
        log.debug("svm %s: %s", self.name, stats)
        return stats
