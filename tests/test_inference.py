"""Test-time speed options: truncated-SVD fc layers and reduced precision (spp_det/inference.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spp_det.detection.detector import Detector
from spp_det.errors import UserError
from spp_det.inference import compress_fc, set_precision, truncated_svd
from spp_det.model import build_model
from spp_det.config import compose_config
from spp_det.settings import RunSettings


def tiny_model(fc_dim=64):
    cfg = compose_config(["model=zf5_narrow", "model.width=0.125", f"model.fc_dim={fc_dim}", "model.scales=[96]"])
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def test_truncated_svd_is_exact_on_a_weight_of_that_rank():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    with torch.no_grad():  # a rank-5 weight: its rank-5 SVD loses nothing
        layer.weight.copy_(torch.randn(30, 5) @ torch.randn(5, 40))
    x = torch.randn(7, 40)
    svd = truncated_svd(layer, 5)
    assert [m.weight.shape for m in svd] == [(5, 40), (30, 5)] and svd[0].bias is None
    assert torch.allclose(svd(x), layer(x), atol=1e-4)


def test_truncated_svd_error_is_the_discarded_singular_values():
    """Eckart-Young: || W - W_t ||_F^2 = sum of the squared singular values beyond t (numpy's SVD)."""
    torch.manual_seed(1)
    layer = nn.Linear(50, 20)
    sigma = np.linalg.svd(layer.weight.detach().double().numpy(), compute_uv=False)
    for rank in (1, 5, 19):
        svd = truncated_svd(layer, rank)
        approx = (svd[1].weight.double() @ svd[0].weight.double()).detach()
        err = torch.linalg.norm(approx - layer.weight.detach().double()).item()
        assert err == pytest.approx(np.sqrt((sigma[rank:] ** 2).sum()), rel=1e-5)
        assert torch.equal(svd[1].bias, layer.bias)


def test_compress_fc_replaces_fc6_and_fc7_and_rejects_useless_ranks():
    model = tiny_model()
    pool5 = torch.randn(9, model.pool5_dim)
    full = model.fc7(pool5)
    compress_fc(model, [32, None])
    assert isinstance(model.head.fc6, nn.Sequential) and isinstance(model.head.fc7, nn.Linear)
    assert model.fc7(pool5).shape == full.shape and model.head.dtype == torch.float32
    with pytest.raises(UserError, match="between 1 and 63"):
        compress_fc(tiny_model(), [None, 64])
    with pytest.raises(UserError, match=r"\[fc6_rank, fc7_rank\]"):
        compress_fc(tiny_model(), [8])


def detector(model, **kwargs):
    k = 3
    gen = torch.Generator().manual_seed(0)
    return Detector(model=model, classes=["a", "b", "c"], svm_weight=torch.randn(k, model.head.out_dim, generator=gen),
                    svm_bias=torch.zeros(k), svm_scale=1.0,
                    bbox_weight=torch.randn(k, model.pool5_dim + 1, 4, generator=gen) * 1e-3, **kwargs)


def image_and_windows():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    xy = rng.uniform(0, 80, (50, 2))
    return image, np.concatenate([xy, xy + rng.uniform(16, 80, (50, 2))], 1).astype(np.float32)


@pytest.mark.parametrize("precision, rel", [("bf16", 0.03), ("int8", 0.1)])
def test_reduced_precision_scores_stay_close_to_fp32(precision, rel):
    image, windows = image_and_windows()
    ref, _ = detector(tiny_model()).score_windows(image, windows)
    fast = detector(tiny_model(), precision=precision)
    scores, boxes = fast.score_windows(image, windows)
    assert scores.dtype == torch.float32 and boxes.dtype == torch.float32  # SVMs and regressors stay fp32
    err = (scores - ref).norm() / ref.norm()
    assert 0 < err < rel  # changed (the arithmetic really is different) but close


def test_bf16_runs_conv5_and_fc_in_bfloat16_and_int8_quantises_the_fc_layers():
    model = tiny_model()
    image, windows = image_and_windows()
    with set_precision(model, "bf16")():
        maps = model.conv5(image)
        fc7 = model.fc7(model.pool5(maps, image.shape[:2], windows))
    assert maps[0].dtype == torch.bfloat16 and fc7.dtype == torch.bfloat16
    model = tiny_model()
    set_precision(model, "int8")
    assert all("quantized.dynamic" in type(fc).__module__ and fc.weight().dtype == torch.qint8
               for fc in (model.head.fc6, model.head.fc7))
    assert type(model.backbone.body[0]) is nn.Conv2d  # conv5 stays fp32
    with pytest.raises(UserError, match="precision must be one of"):
        set_precision(tiny_model(), "fp8")


def test_eval_and_detect_load_the_detector_with_the_configured_precision_and_ranks(tmp_path, monkeypatch):
    from spp_det.detection import detector as detector_module
    from spp_det.stages import detect as stage

    seen = {}
    monkeypatch.setattr(detector_module.Detector, "load",
                        classmethod(lambda cls, path, device, *a, **kw: seen.update(kw) or pytest.skip.Exception))
    (tmp_path / "model.pt").write_bytes(b"")
    cfg = compose_config(["eval.precision=bf16", "eval.fc_rank=[16,8]", f"eval.checkpoint={tmp_path / 'model.pt'}"])
    try:
        stage.load_detector(RunSettings.of(cfg), "eval")
    except AttributeError:  # the stand-in returned by the fake load has no .model
        pass
    assert seen["precision"] == "bf16" and list(seen["fc_rank"]) == [16, 8]
