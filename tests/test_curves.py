"""Training curves: results.csv keeps every stage's rows once, the PNG is drawn, TensorBoard when installed."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from PIL import Image

from spp_det.stages.curves import RESULTS, record_history


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_has_one_row_per_logged_step_and_replaces_a_stage_rewritten(tmp_path):
    cfg = SimpleNamespace(work_dir=str(tmp_path))  # outside a Hydra job: the work_dir
    finetune = [{"step": 100, "lr": 1e-3, "loss": 1.5, "val_loss": 1.7, "val_accuracy": 0.5, "seconds": 2.0},
                {"step": 200, "lr": 1e-4, "loss": 0.9, "val_loss": 1.1, "val_accuracy": 0.7, "seconds": 2.1}]
    svm = [{"step": 1, "class": "cat", "loss": 3.0, "pos_loss": 2.0, "seconds": 0.1},
           {"step": 2, "class": "cat", "loss": 2.5, "pos_loss": 1.5, "seconds": 0.1},
           {"step": 1, "class": "dog", "loss": 4.0, "pos_loss": 3.0, "seconds": 0.2}]
    png = record_history(cfg, "finetune", finetune)
    record_history(cfg, "svm", svm)
    rows = read_csv(tmp_path / RESULTS)
    assert [r["stage"] for r in rows] == ["finetune"] * 2 + ["svm"] * 3
    header = list(rows[0])
    assert header[:4] == ["stage", "step", "lr", "loss"] and header[-1] == "seconds"
    assert {"val_loss", "val_accuracy", "class", "pos_loss"} <= set(header)
    assert rows[1]["val_accuracy"] == "0.7" and rows[1]["lr"] == "0.0001" and rows[2]["lr"] == ""  # svm: no lr
    # a resumed finetune writes its whole history again: its rows are replaced, the svm rows kept
    record_history(cfg, "finetune", finetune + [{"step": 300, "lr": 1e-4, "loss": 0.8, "seconds": 2.0}])
    rows = read_csv(tmp_path / RESULTS)
    assert [r["stage"] for r in rows] == ["svm"] * 3 + ["finetune"] * 3
    assert [r["step"] for r in rows if r["stage"] == "finetune"] == ["100", "200", "300"]
    assert rows[-1]["val_loss"] == ""  # not logged at that step
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300
    assert (tmp_path / "svm_curves.png").is_file()
    assert record_history(cfg, "bboxreg", []) is None and not (tmp_path / "bboxreg_curves.png").exists()


def test_tensorboard_event_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (optional extra: pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = SimpleNamespace(work_dir=str(tmp_path))
    record_history(cfg, "finetune", [{"step": 10, "loss": 2.0, "seconds": 1.0}, {"step": 20, "loss": 1.0, "seconds": 1.0}])
    events = EventAccumulator(str(tmp_path / "tensorboard" / "finetune"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 2.0), (20, 1.0)]
