"""``spp-det train``: every training stage in order, skipping those whose artifact is current.

proposals -> pretrain (when configured) -> features -> finetune -> svm -> bboxreg -> model.pt

The stages and their order are the declarations' (``spp_det.stages.STAGES``, ``in_train``). Each
trained stage decides itself whether its artifact in ``work_dir`` is current (the hash of the
settings and upstream artifacts that change its result, stored in the artifact's ``meta``; see
``spp_det.io.artifact_is_current``), so ``spp-det finetune`` alone skips in the same way, and
returns ``Skipped``, which ``train`` reports as ``skipped (current)``. Caching stages (proposals, features)
always run: their content-keyed caches make repeats cheap. A stage interrupted mid-way resumes from
its own checkpoint or cache. The run ends with a summary of what ran, how long, the peak memory,
and where the artifacts are.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from spp_det import distributed
from spp_det.artifact import TRAIN_SUMMARY
from spp_det.io import write_json
from spp_det.runtime import peak_rss_mb, reset_peak_rss
from spp_det.settings import RunSettings
from spp_det.stages import STAGES
from spp_det.stages.assemble import assemble
from spp_det.stages.curves import RESULTS, history_dir
from spp_det.stages.declare import Skipped, Stage
from spp_det.stages.start import require_trained_backbone

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped (current) | skipped (why)
    seconds: float = 0.0
    peak_mb: float = 0.0
    artifact: str = ""
    curves: list[str] = field(default_factory=list)  # <stage>*_curves.png written by this run (spp_det.stages.curves)


def run_stage(cfg: DictConfig, stage: Stage) -> StageResult:
    """Run one stage's ``run(cfg)``: ``ran`` with its seconds, peak resident MiB and the curves it
    wrote, or ``skipped (why)`` when it returned ``Skipped``. Fails on a non-zero status."""
    run = stage.function()
    reset_peak_rss()
    start, started = time.perf_counter(), time.time()
    log.info("==> %s", stage.name)
    code = run(cfg)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"stage {stage.name} failed with status {code}")
    log.info("<== %s done in %.1f s (peak memory %.0f MiB)", stage.name, seconds, peak_rss_mb())
    artifact = stage.artifact(cfg)
    if isinstance(code, Skipped):
        return StageResult(stage.name, f"skipped ({code.why})", artifact=str(artifact) if code.why == "current" else "")
    curves = [str(p) for p in sorted(history_dir(cfg).glob(f"{stage.name}*_curves.png")) if p.stat().st_mtime >= started]
    return StageResult(stage.name, "ran", seconds, peak_rss_mb(), str(artifact), curves)


def run(cfg: DictConfig) -> int:
    rs = RunSettings.of(cfg)
    require_trained_backbone(rs)  # before any work
    work_dir = Path(rs.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    results = [run_stage(cfg, stage) for stage in STAGES if stage.in_train]
    if not distributed.is_main():  # under torchrun rank 0 assembles model.pt and writes the summary
        return 0
    start = time.perf_counter()
    model_path = assemble(rs)
    results.append(StageResult("model", "ran", time.perf_counter() - start, peak_rss_mb(), str(model_path)))
    print_summary(results, history_dir(cfg) / RESULTS)
    write_json([r.__dict__ for r in results], work_dir / TRAIN_SUMMARY)
    return 0


def print_summary(results: list[StageResult], curves_csv: Path | None = None) -> None:
    lines = [f"{'stage':<10} {'status':<32} {'seconds':>8} {'peak MiB':>9}  artifact"]
    for r in results:
        secs = f"{r.seconds:8.1f}" if r.status == "ran" else f"{'-':>8}"
        peak = f"{r.peak_mb:9.0f}" if r.status == "ran" else f"{'-':>9}"
        lines.append(f"{r.stage:<10} {r.status:<32} {secs} {peak}  {r.artifact}")
    total = sum(r.seconds for r in results)
    lines.append(f"{'total':<10} {'':<32} {total:8.1f}")
    curves = [c for r in results for c in r.curves]
    if curves:
        lines.append(f"training curves: {curves_csv} and " + ", ".join(curves))
    print("\n" + "\n".join(lines), flush=True)
