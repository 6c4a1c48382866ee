"""``spp-det STAGE [hydra overrides...]``: one console script for every stage.

Each stage is a module with ``run(cfg) -> int | None``; the CLI composes ``configs/config.yaml``
with Hydra (so ``--cfg job``, ``hydra.run.dir=...`` and strict key checking work as in any Hydra
app), sets ``stage``, and calls it. A stage whose module does not exist yet says so and exits 2.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from spp_det.errors import UserError

# Stage name -> (module holding run(cfg), one line of help). Order is the pipeline's.
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("spp_det.data.synth", "write the synthetic VOC-layout dataset (data.root=DIR)"),
    "proposals": ("spp_det.proposals.stage", "compute and cache selective-search boxes for a split"),
    "pretrain": ("spp_det.stages.pretrain", "train backbone + pyramid + fc as a classifier (multi-size)"),
    "features": ("spp_det.stages.features", "compute and cache conv5 feature maps per image and scale"),
    "finetune": ("spp_det.stages.finetune", "fine-tune fc6, fc7 and a new fc8 on pooled pyramid vectors"),
    "svm": ("spp_det.stages.svm", "train per-class linear SVMs with hard-negative mining"),
    "bboxreg": ("spp_det.stages.bboxreg", "train per-class box regressors on pool5 features"),
    "train": ("spp_det.stages.train", "run every training stage in order, skipping current ones"),
    "eval": ("spp_det.evaluation.stage", "detect on a test split and compute VOC / COCO mAP"),
    "detect": ("spp_det.detection.stage", "detect objects in a folder of images"),
    "report": ("spp_det.evaluation.report", "rebuild report.html of an eval run: spp-det report RUN_DIR (no model)"),
    "bench": ("spp_det.bench", "time SPP-net against R-CNN mode, seconds per image by step"),
}

# Stages taking plain arguments instead of Hydra overrides; their module has main(argv) -> int.
PLAIN_STAGES = ("report",)

# Keys that moved out of the model group (only eval / detect or bench read them, so no training
# stage declares them: spp_det/stages/declare.py); the old spelling gets an error naming the new.
MOVED_KEYS = {
    "model.checkpoint": "eval.checkpoint (spp-det detect: detect.checkpoint, which defaults to it)",
    "model.test_scales": "eval.scales (spp-det detect: detect.scales, which defaults to it)",
    "model.test_max_size": "eval.max_size (spp-det detect: detect.max_size, which defaults to it)",
    "model.rcnn_context": "bench.rcnn_context",
    "model.rcnn_input": "bench.rcnn_input",
}


def moved_key_errors(overrides: list[str]) -> list[str]:
    """One message per override that spells a key of ``MOVED_KEYS`` the old way."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    return [f"{key} has moved: use {MOVED_KEYS[key]}" for key in keys if key in MOVED_KEYS]

log = logging.getLogger("spp_det")


def config_dir() -> Path:
    """The repository's ``configs/`` (or ``$SPP_DET_CONFIGS``)."""
    path = Path(os.environ.get("SPP_DET_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
    if not (path / "config.yaml").is_file():
        sys.exit(f"spp-det: configs not found at {path}; install with `pip install -e .` from the repository "
                 "or set SPP_DET_CONFIGS to its configs/ folder")
    return path


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: spp-det STAGE [key=value ...] [--cfg job] [hydra options]",
        "",
        "SPP-net object detection. Stages:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in STAGES.items()),
        "",
        "Overrides are Hydra's key=value (e.g. data.root=DIR device=cpu experiment=demo).",
        "`spp-det STAGE --cfg job` prints the composed config; `spp-det STAGE --help` shows Hydra's help.",
    ]
    return "\n".join(lines)


def load_stage(stage: str):
    """The stage's ``run`` function, or ``None`` when that stage is not built yet."""
    module_name = STAGES[stage][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    return getattr(module, "run", None)


def with_overrides(args: list[str], added: list[str]) -> list[str]:
    """``args`` with the ``added`` key=value overrides next to the user's own. Hydra's argparse takes
    the overrides only as one run of positionals, so ours go before the first of the user's (or at
    the end when there is none): ``--cfg job`` then works before or after them."""
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [*args[:first], *added, *args[first:]]


def main(argv: list[str] | None = None) -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: one set of progress bars, rank 0's
        os.environ.setdefault("TQDM_DISABLE", "1")  # (read when tqdm is imported: before any stage module)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if argv else 2)
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"spp-det: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if stage in PLAIN_STAGES:  # reads files a run wrote: no config to compose
        sys.exit(importlib.import_module(STAGES[stage][0]).main(overrides))
    moved = moved_key_errors(overrides)
    if moved:
        print("spp-det: " + "\nspp-det: ".join(moved), file=sys.stderr)
        sys.exit(2)
    run = load_stage(stage)
    if run is None:
        print(f"spp-det: stage {stage!r} is not built yet in this version", file=sys.stderr)
        sys.exit(2)

    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        try:
            code = run(cfg)
        except UserError as exc:
            log.error("%s", exc)
            sys.exit(1)
        if code:
            sys.exit(int(code))

    added = [f"stage={stage}"]
    from spp_det import distributed  # here: it imports torch (1.5 s), which `spp-det --help` does without

    if distributed.init():  # under torchrun: one process group; every rank uses rank 0's run directory stamp
        from datetime import datetime

        stamp = distributed.all_gather(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))[0]
        os.environ.setdefault("SPP_DET_RUN_STAMP", stamp)  # configs/config.yaml hydra.run.dir
        if not distributed.is_main():
            added.append("hydra.output_subdir=null")  # rank 0 writes the run's .hydra/ config files
    sys.argv = [f"spp-det {stage}", *with_overrides(overrides, added)]
    try:
        hydra_main()
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
