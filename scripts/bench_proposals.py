#!/usr/bin/env python
"""Benchmark proposal backends: boxes/image, recall@0.5/0.7, MABO, s/image (1 process), images/s (all cores).

    .venv/bin/python scripts/bench_proposals.py                      # default settings, VOC sample + synth
    .venv/bin/python scripts/bench_proposals.py --setting opencv_fast --setting "opencv_fast proposals.resize_to=300" \
        --max-images 40 --output bench_proposals.json

A setting is a configs/proposals option name followed by Hydra overrides. Timings on a machine
shared with other jobs are pessimistic; say so when quoting them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spp_det.data.voc import load_voc  # noqa: E402
from spp_det.proposals.bench import run_benchmark  # noqa: E402
from spp_det.config import compose_config  # noqa: E402
from spp_det.runtime import num_workers  # noqa: E402

DEFAULT_SETTINGS = ["opencv_fast", "opencv_multires", "selectivesearch"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/voc2012_sample"),
                   help="VOC-layout root (year 2012, split all)")
    p.add_argument("--year", default="2012")
    p.add_argument("--split", default="all")
    p.add_argument("--synth", default="/tmp/synth300", help="synthetic VOC-layout set, used when it exists")
    p.add_argument("--synth-split", default="test")
    p.add_argument("--synth-max-images", type=int, default=30)
    p.add_argument("--setting", action="append", help="'OPTION [key=value ...]' (repeatable)")
    p.add_argument("--max-images", type=int, default=None, help="first N images of each dataset")
    p.add_argument("--slow-max-images", type=int, default=10, help="image limit for the slow selectivesearch backend")
    p.add_argument("--workers", type=int, default=0, help="processes for images/s (0 = all cores)")
    p.add_argument("--output", default="bench_proposals.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    datasets = {}
    if Path(args.data).is_dir():
        datasets["voc2012_sample"] = load_voc(args.data, args.split, year=args.year)[0][: args.max_images]
    else:
        print(f"skipping the VOC sample: {args.data} not found", file=sys.stderr)
    if args.synth and Path(args.synth).is_dir():
        try:
            records = _load_any_classes(args.synth, args.synth_split)
            datasets["synth"] = records[: args.synth_max_images]
        except Exception as exc:  # the synthetic set is optional: say why it was skipped
            print(f"skipping the synthetic set {args.synth}: {exc}", file=sys.stderr)
    settings = {}
    for spec in args.setting or DEFAULT_SETTINGS:
        option, *overrides = spec.split()
        cfg = compose_config([f"proposals={option}", *overrides], stage="bench").proposals
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=True)
        if plain.get("backend") == "selectivesearch" and args.slow_max_images:
            plain["_max_images"] = args.slow_max_images
        settings[spec] = plain
    run_benchmark(settings, datasets, num_workers(args.workers), args.output)
    return 0


def _load_any_classes(root: str, split: str):
    """Records of a VOC-layout set whatever its class names (read from its annotations)."""
    import xml.etree.ElementTree as ET

    from spp_det.data.voc import find_voc_dir, read_split_ids

    voc = find_voc_dir(root, None)
    names = set()
    for image_id in read_split_ids(voc, split):
        for obj in ET.parse(voc / "Annotations" / f"{image_id}.xml").getroot().findall("object"):
            names.add(obj.findtext("name").strip())
    return load_voc(root, split, classes=sorted(names), year=None)[0]


if __name__ == "__main__":
    sys.exit(main())
