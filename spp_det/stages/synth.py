"""``spp-det synth``: write the synthetic VOC-layout dataset (``spp_det.data.synth``) to ``data.root``."""
from __future__ import annotations

from pathlib import Path

from spp_det.data.synth import format_summary, write_synthetic
from spp_det.settings import RunSettings


def run(cfg) -> int:
    """``spp-det synth data.root=DIR [synth.num_images=N synth.seed=S synth.overwrite=true]``."""
    rs = RunSettings.of(cfg)
    root, classes = Path(rs.data.root), list(rs.synth.classes)
    summary = write_synthetic(root, rs.synth, classes)
    print(f"synthetic VOC-layout dataset written to {root}\n")
    print(format_summary(summary))
    if list(rs.data.classes) != classes:
        print(f"\nTrain on it with data=synth data.root={root} (its classes: {', '.join(classes)}).")
    return 0
