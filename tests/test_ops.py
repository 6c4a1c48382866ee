"""Spatial pyramid pooling: the paper's bins, exactly, with gradients."""
import math

import pytest
import torch

from spp_det.ops import SpatialPyramidPool, bin_edges, pyramid_dim, spatial_pyramid_pool


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
