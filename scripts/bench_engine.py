"""Time pyramid pooling alone: 2,000 windows on a ZF-5 conv5 map (256 x 42 x 56, scale 688).

    .venv/bin/python scripts/bench_engine.py [--windows 2000] [--repeat 5] [--channels 256 64]

Prints, per channel count, the min and median seconds of ``spp_det.ops.spatial_pyramid_pool``
(the fused CPU kernel when it is built, issue 4's target is <= 50 ms for 256 channels), of the
torchvision ``roi_pool`` path it falls back to, and of ``torchvision.ops.roi_pool`` called once
per pyramid level; and how long building the kernel took if this run built it. The machine may be
shared: the min is the fairer number. The full per-step benchmark is ``spp-det bench``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torchvision.ops import roi_pool

from spp_det.stages.bench import random_windows
from spp_det.features.projection import project_windows
from spp_det.ops import _ext, spatial_pyramid_pool
from spp_det.ops.spp import _roi_pool_path

LEVELS = (6, 3, 2, 1)  # the paper's ZF-5 pyramid, 50 bins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[256, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    windows = torch.from_numpy(random_windows(688, 917, args.windows, np.random.default_rng(0)))
    cells = project_windows(windows, (42, 56), 16, 20.0, "paper")
    cells = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], dim=1)

    start = time.perf_counter()
    fused = _ext.load() is not None
    print(f"fused CPU kernel: {'loaded' if fused else 'unavailable (roi_pool fallback)'} in "
          f"{time.perf_counter() - start:.1f} s (compile {_ext.compile_seconds() or 0:.1f} s, 0 = cached)")

    def timed(fn) -> tuple[float, float]:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times), statistics.median(times)

    with torch.inference_mode():
        for channels in args.channels:
            features = torch.relu(torch.randn(1, channels, 42, 56))
            spp = timed(lambda: spatial_pyramid_pool(features, cells, LEVELS))
            fallback = timed(lambda: _roi_pool_path(features, cells, list(LEVELS)))
            per_level = timed(lambda: [roi_pool(features, cells.float(), (n, n), 1.0) for n in LEVELS])
            print(f"{args.windows} windows, {channels} x 42 x 56 map, {torch.get_num_threads()} threads, "
                  f"min / median of {args.repeat} (s): spatial_pyramid_pool {spp[0]:.3f} / {spp[1]:.3f}, "
                  f"roi_pool path {fallback[0]:.3f} / {fallback[1]:.3f}, "
                  f"roi_pool per level {per_level[0]:.3f} / {per_level[1]:.3f}")


if __name__ == "__main__":
    main()
