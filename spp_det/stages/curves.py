"""Training curves: every training stage's history in ``results.csv`` and a PNG, TensorBoard optional.

``record_history(run, stage, rows)`` is called once a stage has its history (one dict per logged
step). It replaces that stage's rows in ``results.csv`` of the run directory (Hydra's run
directory; ``work_dir`` when a stage runs as a plain function, as in tests) and keeps the other
stages' rows, so ``spp-det train`` leaves one file with every stage, and a resumed stage, whose
history holds the steps before the interruption too, is not written twice. Columns: ``stage``,
``step``, ``lr``, ``loss``, then the stage's other numbers (validation loss and accuracy, SVM
objective parts, ...) and ``seconds`` (the time the logged step took); a blank cell is a number the
stage does not log. ``<stage>_curves.png`` plots the same rows. When the ``tensorboard`` package is
installed (``pip install -e '.[tensorboard]'``), the numbers also go to TensorBoard event files
under ``tensorboard/<stage>/`` (``tensorboard --logdir RUN_DIR/tensorboard``).
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from spp_det.distributed import is_main
from spp_det.evaluation.plots import new_figure, png_bytes
from spp_det.io import atomic_path

log = logging.getLogger(__name__)

RESULTS = "results.csv"
LEADING = ("stage", "step", "lr", "loss")  # then the stage's own columns, then "seconds"


def history_dir(run) -> Path:
    """Hydra's run directory of this job, else ``run.work_dir`` (``run``: the run's settings or config)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(run.work_dir)


def _number(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_results_csv(path: Path, stage: str, rows: list[dict]) -> None:
    """Replace ``stage``'s rows of the CSV at ``path`` with ``rows`` (each gets ``stage``), atomically."""
    kept, columns = [], list(LEADING)
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns and c != "seconds"]
            kept = [r for r in reader if r.get("stage") != stage]
    new = [{"stage": stage, **{k: _number(v) for k, v in r.items()}} for r in rows]
    for r in new:
        columns += [c for c in r if c not in columns and c != "seconds"]
    columns.append("seconds")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept + new)
    with atomic_path(path) as tmp:
        tmp.write_text(text.getvalue(), encoding="utf-8")


def curves_figure(stage: str, rows: list[dict]):
    """One panel per kind of number: losses, accuracies, learning rate; other numbers against
    ``step``. Rows with a ``class`` (SVM retrainings, box regressors) give one line per class."""
    names = [k for r in rows for k in r if k not in ("step", "class", "seconds", "epoch", "iteration", "size")]
    names = list(dict.fromkeys(names))
    panels = {"loss": [n for n in names if "loss" in n or n == "objective"],
              "accuracy": [n for n in names if "acc" in n],
              "learning rate": [n for n in names if n == "lr"]}
    panels = {title: cols for title, cols in panels.items() if cols}
    rest = [n for n in names if not any(n in cols for cols in panels.values())]
    panels.update({n: [n] for n in rest})
    fig = new_figure(4.2 * max(len(panels), 1), 3.2)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    groups = list(dict.fromkeys(r.get("class") for r in rows))
    for ax, (title, cols) in zip(axes, panels.items()):
        for col in cols:
            for group in groups:
                points = [(r["step"], r[col]) for r in rows if r.get("class") == group and _number(r.get(col)) != ""]
                if points:
                    label = col if group is None else f"{group} {col}" if len(cols) > 1 else str(group)
                    ax.plot(*zip(*points), marker="." if len(points) < 30 else None, lw=1.2, label=label)
        if title == "learning rate":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{stage}: training curves")
    return fig


def record_history(run, stage: str, rows: list[dict]) -> Path | None:
    """Write ``rows`` (dicts with ``step`` and numbers: ``lr``, ``loss``, ``val_*``, ``seconds``,
    optionally ``class``) of ``stage`` to ``results.csv`` and ``<stage>_curves.png`` in the run
    directory (module docstring), and to TensorBoard when installed. Returns the PNG's path (None
    without rows). A failure here is logged, never raised: the stage's artifact is what counts.
    Under ``torchrun`` only rank 0 writes (the others return None)."""
    if not rows or not is_main():
        return None
    out = history_dir(run)
    try:
        write_results_csv(out / RESULTS, stage, rows)
        png = out / f"{stage}_curves.png"
        with atomic_path(png) as tmp:
            tmp.write_bytes(png_bytes(curves_figure(stage, rows)))
    except (OSError, ValueError) as exc:
        log.warning("%s: could not write its training curves to %s (%s)", stage, out, exc)
        return None
    _tensorboard(out / "tensorboard" / stage, rows)
    log.info("%s: training curves in %s and %s", stage, out / RESULTS, png)
    return png


def _tensorboard(folder: Path, rows: list[dict]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package
    except ImportError:
        return
    with SummaryWriter(str(folder)) as writer:
        for r in rows:
            prefix = f"{r['class']}/" if r.get("class") is not None else ""
            for key, value in r.items():
                if key not in ("step", "class") and isinstance(value, (int, float)) and _number(value) != "":
                    writer.add_scalar(prefix + key, value, int(r["step"]))
