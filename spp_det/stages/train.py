"""``spp-det train``: every training stage in order, skipping those whose artifact is current.

proposals -> pretrain (when configured) -> features -> finetune -> svm -> bboxreg -> model.pt

Each trained stage decides itself whether its artifact in ``work_dir`` is current (the hash of the
settings and upstream artifacts that change its result, stored in the artifact's ``meta``; see
``spp_det.io.artifact_is_current``), so ``spp-det finetune`` alone skips in the same way; ``train``
reports a stage whose artifact it left untouched as skipped. Caching stages (proposals, features)
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
from spp_det.config import load_stage
from spp_det.io import write_json
from spp_det.stages import proposals
from spp_det.runtime import peak_rss_mb, reset_peak_rss
from spp_det.stages import bboxreg, features, finetune, pretrain, svm
from spp_det.stages.assemble import assemble
from spp_det.stages.curves import RESULTS, history_dir
from spp_det.stages.start import pretrain_configured, require_trained_backbone

log = logging.getLogger(__name__)

# the stages in order, each with its declaration (spp_det.stages.declare), which names its artifact:
# a work_dir file for a trained stage, a content-keyed cache for a caching one
DECLARED = {"proposals": proposals.STAGE, "pretrain": pretrain.CROPS,  # both pretraining phases write pretrain.pt
            "features": features.STAGE, "finetune": finetune.STAGE, "svm": svm.STAGE, "bboxreg": bboxreg.STAGE}


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped (current) | skipped (why)
    seconds: float = 0.0
    peak_mb: float = 0.0
    artifact: str = ""
    curves: list[str] = field(default_factory=list)  # <stage>*_curves.png written by this run (spp_det.stages.curves)


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of ``path``, or None: tells whether a stage rewrote its artifact."""
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None


def run_stage(cfg: DictConfig, stage: str, **kwargs) -> tuple[float, float]:
    """Run one stage's ``run(cfg, **kwargs)``; returns (seconds, peak resident MiB). Fails on non-zero status."""
    run = load_stage(stage)
    if run is None:
        raise RuntimeError(f"stage {stage!r} is not built in this version")
    reset_peak_rss()
    start = time.perf_counter()
    log.info("==> %s", stage)
    code = run(cfg, **kwargs)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"stage {stage} failed with status {code}")
    log.info("<== %s done in %.1f s (peak memory %.0f MiB)", stage, seconds, peak_rss_mb())
    return seconds, peak_rss_mb()


def run(cfg: DictConfig) -> int:
    require_trained_backbone(cfg)  # before any work
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    for stage, declared in DECLARED.items():
        if stage == "pretrain" and not pretrain_configured(cfg):
            why = "ImageNet weights given" if cfg.model.weights else "pretrain.enabled=false"
            results.append(StageResult(stage, f"skipped ({why})"))
            continue
        artifact = declared.path(cfg)
        before = None if declared.cache else _stamp(artifact)
        started = time.time()
        # training reads no test image: eval computes the test split's proposals
        seconds, peak = run_stage(cfg, stage, **({"with_test": False} if stage == "proposals" else {}))
        if before is not None and _stamp(artifact) == before:
            results.append(StageResult(stage, "skipped (current)", artifact=str(artifact)))
        else:
            curves = [str(p) for p in sorted(history_dir(cfg).glob(f"{stage}*_curves.png")) if p.stat().st_mtime >= started]
            results.append(StageResult(stage, "ran", seconds, peak, str(artifact), curves))

    if not distributed.is_main():  # under torchrun rank 0 assembles model.pt and writes the summary
        return 0
    start = time.perf_counter()
    model_path = assemble(cfg)
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
