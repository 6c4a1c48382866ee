"""Time pyramid pooling alone: 2,000 windows on a ZF-5 conv5 map (256 x 42 x 56, scale 688).

    .venv/bin/python scripts/bench_engine.py [--windows 2000] [--repeat 5]

Prints the median seconds of ``spp_det.ops.spatial_pyramid_pool`` and, for comparison, of
``torchvision.ops.roi_pool`` called once per pyramid level. The full per-step benchmark is
``spp-det bench``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torchvision.ops import roi_pool

from spp_det.bench import random_windows
from spp_det.features.projection import project_windows
from spp_det.ops import spatial_pyramid_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    features = torch.relu(torch.randn(1, 256, 42, 56))
    windows = torch.from_numpy(random_windows(688, 917, args.windows, np.random.default_rng(0)))
    cells = project_windows(windows, (42, 56), 16, 20.0, "paper")
    cells = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], dim=1)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        spp = timed(lambda: spatial_pyramid_pool(features, cells))
        per_level = timed(lambda: [roi_pool(features, cells.float(), (n, n), 1.0) for n in (6, 3, 2, 1)])
    print(f"{args.windows} windows, 256 x 42 x 56 map, {torch.get_num_threads()} threads: "
          f"spatial_pyramid_pool {spp:.3f} s, roi_pool per level {per_level:.3f} s (median of {args.repeat})")


if __name__ == "__main__":
    main()
