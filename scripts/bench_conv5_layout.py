"""Whole conv5 of one image in NCHW against channels-last (NHWC) input, side by side, fp32 and bf16.

Why Backbone.body_input hands the conv layers channels-last memory (README "Speed"). Random weights: the
timing does not depend on them. Usage:
    .venv/bin/python scripts/bench_conv5_layout.py [--size 480 640] [--repeat 5] [--models lite0 zf5 vgg16]
"""
from __future__ import annotations

import argparse
import time

import torch

from spp_det.features.backbones import pad_to_minimum
from spp_det.model import build_model
from spp_det.config import compose_config

MODELS = {"lite0": [], "zf5": ["model=zf5"], "vgg16": ["~experiment", "model=vgg16"]}


def ms(fn, repeat: int) -> float:
    """Mean milliseconds of ``fn()`` over ``repeat`` runs after two warm-up runs."""
    with torch.inference_mode():
        fn(), fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
    return (time.perf_counter() - start) / repeat * 1000


def nchw(backbone, x):
    """conv5 the plain way: the conv layers on NCHW input, without ``Backbone.body_input``'s layout."""
    out = backbone.body(pad_to_minimum(x, backbone.min_input))
    return out[-1] if isinstance(out, (list, tuple)) else out  # timm's features_only body: one map per level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    x = torch.randn(1, 3, *args.size)
    print(f"conv5 of one {args.size[0]}x{args.size[1]} image, {torch.get_num_threads()} threads, ms")
    print(f"{'model':8} {'fp32 NCHW':>10} {'fp32 NHWC':>10} {'bf16 NCHW':>10} {'bf16 NHWC':>10} {'max diff':>9}")
    for name in args.models:
        backbone = build_model(compose_config(MODELS[name]).model, pretrained=False).backbone.eval()
        row = []
        for dtype in (None, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                row += [ms(lambda: nchw(backbone, x), args.repeat), ms(lambda: backbone(x), args.repeat)]
        with torch.inference_mode():
            diff = (nchw(backbone, x) - backbone(x)).abs().max().item()
        print(f"{name:8} " + " ".join(f"{v:10.0f}" for v in row) + f" {diff:9.1e}")


if __name__ == "__main__":
    main()
