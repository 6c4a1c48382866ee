"""scripts/reproduce.py: the table rows it writes from eval's metrics.json (no training here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(map07, map10, ap75, without=None):
    m = {"map_voc07": map07, "map_voc10": map10, "coco": {"AP50": map07, "AP75": ap75, "APs": None}}
    if without is not None:
        m["without_bbox_reg"] = {"map_voc07": without}
    return m


def test_row_in_percent_and_missing_columns(reproduce):
    row = reproduce.row(metrics(0.806, 0.86, 0.363, without=0.787))
    assert row[:5] == pytest.approx([80.6, 78.7, 86.0, 80.6, 36.3])
    assert row[5] is None
    assert reproduce.row(metrics(0.5, 0.5, 0.1))[1] is None  # eval ran without the box-regression pair


def test_markdown_mean_and_range_per_column(reproduce):
    rows = {0: [80.6, 78.7, 86.0, 85.5, 36.3, None], 1: [89.0, 68.0, 91.4, 91.3, 43.4, None],
            2: [88.1, 66.5, 88.7, 88.0, 32.9, None]}
    info = {"processor": "AMD EPYC", "date": "2026-12-08",
            "seeds": {"0": {"train_minutes": 7.2}, "1": {"train_minutes": None}, "2": {"train_minutes": 3.0}}}
    text = reproduce.markdown("raccoon", [0, 1, 2], rows, info)
    mean_line = next(line for line in text.splitlines() if line.startswith("| **mean"))
    cells = [c.strip() for c in mean_line.strip("|").split("|")]
    # (80.6 + 89.0 + 88.1) / 3 = 85.9; min 80.6, max 89.0
    assert cells[1] == "85.9 (80.6–89.0)"
    assert cells[2] == "71.1 (66.5–78.7)"
    assert cells[6] == "–"  # no seed has AP-small
    assert "scripts/reproduce.py raccoon --seeds 0 1 2" in text  # the table names its command
    assert "7.2, reused, 3.0" in text
