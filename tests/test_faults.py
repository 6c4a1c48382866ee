"""Faults (slow): ``scripts/fault_injection.py`` kills ``spp-det train`` with SIGKILL once in each
stage, resumes, and finds no corrupt file and every resumed artifact equal to an uninterrupted
run's (the full harness: at least 20 kills, README / docs/ARCHITECTURE.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fault_injection.py"


@pytest.mark.slow
def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path), "--kills", "6", "--seed", "1"],
                            capture_output=True, text=True, timeout=3600)
    report = json.loads((tmp_path / "fault_injection.json").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["corrupt"] == []
    assert sum(report["kills"].values()) == 6 and "finished" not in report["kills"]
    artifacts = {name: d for name, d in report["artifacts"].items() if not name.startswith("cache/")}
    assert {"work/finetune.pt", "work/svm.pt", "work/bboxreg.pt", "work/model.pt", "work/pretrain.pt"} <= set(artifacts)
    assert all(not d["differ"] for d in report["artifacts"].values()), report["artifacts"]
