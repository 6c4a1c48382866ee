"""``spp-det report RUN_DIR``: rebuild an eval run's ``report.html`` from its files (no model, no
Hydra: the one stage declared ``plain`` in ``spp_det.stages.STAGES``)."""
from __future__ import annotations

import argparse
import logging
import sys

from spp_det.errors import UserError
from spp_det.evaluation.report import DATA_FILE, build_report
from spp_det.io import check_writable


def main(argv: list[str]) -> int:
    """``spp-det report RUN_DIR``: rebuild ``RUN_DIR/report.html`` (no model, no Hydra)."""
    parser = argparse.ArgumentParser(prog="spp-det report",
                                     description="Rebuild report.html of an eval run directory from its "
                                                 f"{DATA_FILE} and metrics.json (no model needed).")
    parser.add_argument("run_dir", help="the eval run directory (hydra.run.dir of `spp-det eval`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        check_writable(args.run_dir, "report.html")  # before the examples' images are read and drawn
        path = build_report(args.run_dir)
    except UserError as exc:
        print(f"spp-det report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
