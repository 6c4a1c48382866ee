"""Box regression (R-CNN appendix C): parameterisation, ridge solve, and the `bboxreg` stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spp_det.boxes import apply_deltas, encode_deltas
from spp_det.heads.bboxreg import fit_regressor, predict, ridge


def test_encode_apply_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    proposals = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=g) * 80], dim=1)
    gt = proposals + torch.randn(50, 4, generator=g) * 3
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    assert torch.allclose(apply_deltas(proposals, encode_deltas(proposals, gt)), gt, atol=1e-3)
    # centre/size of continuous boxes: a box shifted by its own width has dx = 1, same size -> dw = 0
    t = encode_deltas(torch.tensor([[0.0, 0.0, 10.0, 20.0]]), torch.tensor([[10.0, 0.0, 20.0, 20.0]]))
    assert torch.allclose(t, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # [N, K, 4] deltas broadcast each window over the classes
    assert apply_deltas(proposals, torch.zeros(50, 3, 4)).shape == (50, 3, 4)


def test_ridge_primal_and_dual_agree_and_shrink_with_lambda():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 60, generator=g), torch.randn(30, 2, generator=g)
    w_dual = ridge(x, y, 5.0)  # N < D + 1: dual
    a = torch.cat([x, torch.ones(30, 1)], 1).double()
    w_primal = torch.linalg.solve(a.T @ a + 5.0 * torch.eye(61, dtype=torch.float64), a.T @ y.double())
    assert torch.allclose(w_dual.double(), w_primal, atol=1e-5)
    assert ridge(x, y, 1e4).norm() < ridge(x, y, 1.0).norm()


def test_box_regression_lowers_the_mean_box_error_on_a_toy_set():
    """Features that linearly encode the proposal's offset from its object: the regressor learns it."""
    g = torch.Generator().manual_seed(2)

    def toy(n):
        xy = torch.rand(n, 2, generator=g) * 200
        wh = 40 + torch.rand(n, 2, generator=g) * 60
        gt = torch.cat([xy, xy + wh], 1)
        offsets = torch.randn(n, 4, generator=g) * torch.tensor([0.08, 0.08, 0.1, 0.1])
        proposals = apply_deltas(gt, offsets)  # proposals off their objects
        true = encode_deltas(proposals, gt)
        mix = torch.randn(4, 64, generator=g)
        feats = torch.relu(true @ mix * 10 + 5) + torch.rand(n, 64, generator=g) * 0.1
        return feats, proposals, gt

    feats, proposals, gt = toy(2000)
    w = fit_regressor(feats, proposals, gt, lam=1.0)
    assert w.shape == (65, 4)
    moved = apply_deltas(proposals, predict(feats, w[None])[:, 0])
    err_before = (proposals - gt).abs().mean()
    err_after = (moved - gt).abs().mean()
    assert err_after < 0.5 * err_before, (float(err_before), float(err_after))


def test_bboxreg_stage_writes_one_regressor_per_class(tmp_path, monkeypatch):
    from test_svm import tiny_setup

    from spp_det import io
    from spp_det.stages import bboxreg as bboxreg_stage
    from spp_det.stages import svm as svm_stage

    cfg = tiny_setup(tmp_path, monkeypatch)
    monkeypatch.setattr(bboxreg_stage, "training_records", svm_stage.training_records)
    assert bboxreg_stage.run(cfg) == 0
    out = io.load_torch(tmp_path / "work" / "bboxreg.pt")
    assert out["weight"].shape == (2, 3200 + 1, 4)
    assert all(c >= 4 for c in out["counts"])  # at least the 4 ground-truth boxes per class
    assert torch.isfinite(out["weight"]).all() and out["feature_scale"] > 0


def test_reservoir_keeps_a_uniform_bounded_sample():
    from spp_det.stages.bboxreg import Reservoir

    r = Reservoir(100, np.random.default_rng(0))
    for i in range(50):
        x = torch.arange(i * 40, i * 40 + 40).float()[:, None] / 2000
        r.add(x, torch.zeros(40, 4), torch.zeros(40, 4))
    f, _, _ = r.dense()
    assert r.seen == 2000 and f.shape == (100, 1)
    assert 0.35 < float(f.float().mean()) < 0.65  # uniform over [0, 1), not the first 100 rows (mean 0.025)
    assert len(torch.unique(f)) > 90
