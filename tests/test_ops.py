"""Spatial pyramid pooling: the paper's bins, exactly, with gradients.

The fused CPU kernel is built on first use (once per machine, ~20-40 s on 2 cores, in
``$SPP_DET_EXT_DIR`` or ``~/.cache/spp_det/ext``); tests that need it skip visibly when it cannot be
built here, and everything else then checks the torchvision fallback instead.
"""
import logging
import math
import shutil

import pytest
import torch

from spp_det.ops import SpatialPyramidPool, _ext, bin_edges, pyramid_dim, spatial_pyramid_pool
from spp_det.ops.spp import _roi_pool_path


def direct_pool(features, cells, levels):
    """The paper's formula as a plain loop: bin i of n over w cells spans floor(i*w/n)..ceil((i+1)*w/n)-1."""
    out = []
    for b, x1, y1, x2, y2 in cells.tolist():
        w, h = x2 - x1 + 1, y2 - y1 + 1
        vec = []
        for n in levels:
            level = []
            for i in range(n):  # rows
                ys, ye = y1 + math.floor(i * h / n), y1 + math.ceil((i + 1) * h / n) - 1
                row = []
                for j in range(n):  # columns
                    xs, xe = x1 + math.floor(j * w / n), x1 + math.ceil((j + 1) * w / n) - 1
                    row.append(features[b, :, ys : ye + 1, xs : xe + 1].amax(dim=(1, 2)))
                level.append(torch.stack(row, dim=1))  # [C, n]
            vec.append(torch.stack(level, dim=1).reshape(-1))  # [C, n, n] channel-major
        out.append(torch.cat(vec))
    return torch.stack(out)


def random_cells(N, H, W, K, gen):
    x1 = torch.randint(0, W, (K,), generator=gen)
    x2 = torch.minimum(x1 + torch.randint(0, W, (K,), generator=gen), torch.tensor(W - 1))
    y1 = torch.randint(0, H, (K,), generator=gen)
    y2 = torch.minimum(y1 + torch.randint(0, H, (K,), generator=gen), torch.tensor(H - 1))
    return torch.stack([torch.randint(0, N, (K,), generator=gen), x1, y1, x2, y2], dim=1)


@pytest.mark.parametrize("shape", [(2, 3, 13, 17), (1, 4, 5, 7), (1, 2, 1, 1), (3, 2, 31, 9), (1, 1, 43, 57)])
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 3, 1), (7,), (1, 2, 6)])
def test_bins_equal_the_direct_formula_on_random_maps_of_odd_sizes(shape, levels):
    gen = torch.Generator().manual_seed(sum(shape) + sum(levels))
    features = torch.randn(*shape, generator=gen)
    cells = random_cells(shape[0], shape[2], shape[3], 120, gen)
    assert torch.equal(spatial_pyramid_pool(features, cells, levels), direct_pool(features, cells, levels))


def test_bin_edges_are_exact_where_floating_point_would_round():
    # i * w / n is whole for w = 10, n = 6, i = 3 (and 3 * 1.666.. in floats need not be): bin 3 starts at 5
    first, last = bin_edges(torch.tensor([0]), torch.tensor([10]), 6)
    assert first.tolist() == [[0, 1, 3, 5, 6, 8]]
    assert last.tolist() == [[1, 3, 4, 6, 8, 9]]


def test_output_length_is_channels_times_sum_of_bins():
    features = torch.rand(1, 5, 9, 11)
    out = spatial_pyramid_pool(features, torch.tensor([[0, 0, 0, 10, 8], [0, 3, 3, 3, 3]]))
    assert out.shape == (2, 5 * 50) == (2, pyramid_dim(5, (6, 3, 2, 1)))


def test_a_window_covering_the_whole_map_pools_to_the_global_max_at_the_1x1_level():
    features = torch.randn(2, 4, 7, 9)
    out = spatial_pyramid_pool(features, torch.tensor([[1, 0, 0, 8, 6]]), (6, 3, 2, 1))
    one_by_one = out[0, -4:]  # the 1x1 level comes last, one value per channel
    assert torch.equal(one_by_one, features[1].amax(dim=(1, 2)))
    assert not torch.equal(one_by_one, features[0].amax(dim=(1, 2)))


def test_a_one_cell_window_repeats_that_cell_in_every_bin():
    features = torch.randn(1, 3, 4, 4)
    out = spatial_pyramid_pool(features, torch.tensor([[0, 2, 1, 2, 1]]), (6, 1))
    assert torch.equal(out[0, :108].view(3, 36), features[0, :, 1, 2][:, None].expand(3, 36))


def test_an_empty_window_list_returns_an_empty_tensor_of_the_right_width():
    out = spatial_pyramid_pool(torch.rand(1, 8, 5, 5), torch.zeros((0, 5), dtype=torch.long))
    assert out.shape == (0, 8 * 50)


def test_duplicate_windows_give_identical_rows_in_input_order():
    features = torch.randn(1, 3, 6, 6)
    cells = torch.tensor([[0, 1, 1, 4, 4], [0, 0, 0, 5, 5], [0, 1, 1, 4, 4]])
    out = spatial_pyramid_pool(features, cells)
    assert torch.equal(out[0], out[2]) and torch.equal(out, direct_pool(features, cells, (6, 3, 2, 1)))


def test_cells_outside_the_map_are_refused():
    with pytest.raises(ValueError, match="inside"):
        spatial_pyramid_pool(torch.rand(1, 2, 4, 4), torch.tensor([[0, 0, 0, 4, 3]]))
    with pytest.raises(ValueError, match="inside"):
        spatial_pyramid_pool(torch.rand(1, 2, 4, 4), torch.tensor([[0, 3, 0, 2, 3]]))


def test_gradients_flow_and_equal_the_direct_version():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    cells = random_cells(2, 9, 13, 25, gen)
    weights = torch.randn(25, 3 * 50, generator=gen, dtype=torch.float64)
    a = features.clone().requires_grad_(True)
    (spatial_pyramid_pool(a, cells) * weights).sum().backward()
    b = features.clone().requires_grad_(True)
    (direct_pool(b, cells, (6, 3, 2, 1)) * weights).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert torch.allclose(a.grad, b.grad)


def test_module_wrapper_has_a_useful_repr_and_matches_the_function():
    pool = SpatialPyramidPool([6, 3, 2, 1])
    assert "levels=(6, 3, 2, 1)" in repr(pool) and "bins=50" in repr(pool)
    assert pool.out_dim(256) == 12800
    features, cells = torch.rand(1, 2, 5, 6), torch.tensor([[0, 1, 0, 5, 4]])
    assert torch.equal(pool(features, cells), spatial_pyramid_pool(features, cells))


@pytest.fixture(scope="module")
def fused_ops():
    """``torch.ops.spp_det`` (the fused CPU kernel), building it if needed; skips visibly without it."""
    if _ext.disabled():
        pytest.skip("SPP_DET_NO_EXT is set: the fused kernel is switched off")
    ops = _ext.load()
    if ops is None:
        pytest.skip("the fused CPU pyramid pooling kernel could not be built here (see the logged warning)")
    return ops


def fused_and_fallback(features, cells, levels):
    """(fused kernel output, roi_pool path output); only the first goes through the kernel."""
    levels = list(levels)
    return spatial_pyramid_pool(features, cells, levels), _roi_pool_path(features, cells, levels)


@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 3, 1), (5,), (1, 2, 6), (3, 6)])
def test_fused_kernel_equals_the_formula_and_roi_pool_on_a_batch_of_two_odd_maps(fused_ops, levels):
    gen = torch.Generator().manual_seed(7 + sum(levels))
    features = torch.randn(2, 70, 11, 23, generator=gen)  # 70 channels: a 64-block plus a remainder
    cells = random_cells(2, 11, 23, 150, gen)
    fused, fallback = fused_and_fallback(features, cells, levels)
    assert torch.equal(fused, direct_pool(features, cells, levels))
    assert torch.equal(fused, fallback)


def test_fused_kernel_handles_windows_on_the_map_edges_and_single_cells(fused_ops):
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 5, 9, 14, generator=gen)
    cells = torch.tensor([[0, 0, 0, 13, 8],    # the whole map
                          [1, 13, 8, 13, 8],   # the last cell only
                          [1, 0, 0, 0, 0],     # the first cell only
                          [0, 13, 0, 13, 8],   # the last column, one cell wide
                          [1, 0, 8, 13, 8],    # the last row, one cell high
                          [0, 11, 6, 13, 8]])  # 3 x 3 in the corner: fewer cells than 6 bins
    fused, fallback = fused_and_fallback(features, cells, (6, 3, 2, 1))
    assert torch.equal(fused, direct_pool(features, cells, (6, 3, 2, 1)))
    assert torch.equal(fused, fallback)
    last_cell = features[1, :, 8, 13][:, None]  # [C, 1]: every bin of every level repeats it
    assert torch.equal(fused[1], torch.cat([last_cell.expand(5, n * n).reshape(-1) for n in (6, 3, 2, 1)]))


def test_fused_kernel_pools_fp16_maps_in_float_and_returns_fp16(fused_ops):
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(1, 16, 13, 17, generator=gen).half()  # a conv5 cache stores fp16
    cells = random_cells(1, 13, 17, 60, gen)
    fused, fallback = fused_and_fallback(features, cells, (6, 3, 2, 1))
    assert fused.dtype == torch.float16
    assert torch.equal(fused, direct_pool(features.float(), cells, (6, 3, 2, 1)).half())
    assert torch.equal(fused, fallback)


def test_fused_kernel_copes_with_non_contiguous_maps_and_float_cells(fused_ops):
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(1, 20, 15, 30, generator=gen)[:, ::2, :, ::2]  # 10 x 15 x 15, strided
    cells = random_cells(1, 15, 15, 40, gen)
    assert torch.equal(spatial_pyramid_pool(features, cells.float()), direct_pool(features, cells, (6, 3, 2, 1)))


@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 3, 1)])
def test_fused_kernel_gradients_equal_the_direct_version(fused_ops, levels):
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 67, 9, 13, generator=gen)
    cells = random_cells(2, 9, 13, 30, gen)
    weights = torch.randn(30, pyramid_dim(67, levels), generator=gen)
    grads = []
    for pool in (spatial_pyramid_pool, lambda f, c, lv: direct_pool(f, c, lv)):
        leaf = features.clone().requires_grad_(True)
        (pool(leaf, cells, levels) * weights).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_fallback_path_gradients_equal_the_direct_version(monkeypatch):
    monkeypatch.setenv("SPP_DET_NO_EXT", "1")
    test_gradients_flow_and_equal_the_direct_version()


def test_spp_det_no_ext_forces_the_exact_roi_pool_fallback(monkeypatch):
    monkeypatch.setenv("SPP_DET_NO_EXT", "1")
    assert _ext.load() is None
    calls = []
    monkeypatch.setattr("spp_det.ops.spp._roi_pool_level",
                        lambda *a, _real=__import__("spp_det.ops.spp", fromlist=["x"])._roi_pool_level:
                        calls.append(1) or _real(*a))
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(1, 3, 10, 12, generator=gen)
    cells = random_cells(1, 10, 12, 30, gen)
    assert torch.equal(spatial_pyramid_pool(features, cells, (6, 3, 2, 1)), direct_pool(features, cells, (6, 3, 2, 1)))
    assert calls, "SPP_DET_NO_EXT=1 must route through roi_pool"


def test_a_failing_compile_falls_back_with_one_warning_and_is_not_retried(monkeypatch, tmp_path, caplog):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a broken compiler")
    monkeypatch.delenv("SPP_DET_NO_EXT", raising=False)
    monkeypatch.setenv("SPP_DET_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", false)
    monkeypatch.setattr(_ext, "_state", {"tried": False, "ops": None, "compile_s": None})
    with caplog.at_level(logging.WARNING, logger="spp_det.ops._ext"):
        assert _ext.load() is None
        assert _ext.load() is None  # the same process: no second try, no second warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert list(tmp_path.glob("*.failed")), "a failed compile leaves a marker so other processes skip it"
    monkeypatch.setattr(_ext, "_state", {"tried": False, "ops": None, "compile_s": None})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spp_det.ops._ext"):
        assert _ext.load() is None  # a new process: sees the marker instead of compiling again
    assert "earlier compile failed" in caplog.text
    features = torch.randn(1, 2, 5, 6)
    cells = torch.tensor([[0, 0, 0, 5, 4]])
    assert torch.equal(spatial_pyramid_pool(features, cells), direct_pool(features, cells, (6, 3, 2, 1)))
