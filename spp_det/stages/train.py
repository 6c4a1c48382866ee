"""``spp-det train``: every training stage in order, skipping those whose artifact is current.

proposals -> pretrain (when configured) -> features -> finetune -> svm -> bboxreg -> model.pt

A trained stage's artifact in ``work_dir`` is "current" when the fingerprint stored beside it
(``<stage>.done.json``: a hash of the settings that change the result and of the upstream
artifacts' bytes) matches the one this run would write; then the stage is skipped. Caching
stages (proposals, features) always run: their content-keyed caches make repeats cheap, and a
stage interrupted mid-way resumes from its own checkpoint or cache. The run ends with a summary
of what ran, how long, the peak memory, and where the artifacts are.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from spp_det.cli import load_stage
from spp_det.io import hash_file, hash_settings, write_json
from spp_det.runtime import peak_rss_mb, reset_peak_rss

log = logging.getLogger(__name__)

# Config sections that change each stage's result (device, workers and output paths do not).
RESULT_SECTIONS = {
    "pretrain": ["data", "model", "pretrain", "seed"],
    "finetune": ["data", "model", "proposals", "finetune", "seed"],
    "svm": ["data", "model", "proposals", "svm", "seed"],
    "bboxreg": ["data", "model", "proposals", "bboxreg", "seed"],
}
UPSTREAM = {"pretrain": [], "finetune": ["pretrain.pt"], "svm": ["finetune.pt"], "bboxreg": ["finetune.pt"]}
IGNORED_MODEL_KEYS = ("checkpoint",)  # eval/detect only


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped (current) | skipped (disabled)
    seconds: float = 0.0
    peak_mb: float = 0.0
    artifact: str = ""


def fingerprint(cfg: DictConfig, stage: str, work_dir: Path) -> str:
    """Hash of the settings and upstream artifacts that determine ``stage``'s artifact."""
    settings = {}
    for key in RESULT_SECTIONS[stage]:
        value = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        if key == "model":
            value = {k: v for k, v in value.items() if k not in IGNORED_MODEL_KEYS}
        settings[key] = value
    settings["upstream"] = {
        name: hash_file(work_dir / name) for name in UPSTREAM[stage] if (work_dir / name).is_file()
    }
    return hash_settings(settings)


def is_current(work_dir: Path, stage: str, print_: str) -> bool:
    done, artifact = work_dir / f"{stage}.done.json", work_dir / f"{stage}.pt"
    if not (done.is_file() and artifact.is_file()):
        return False
    try:
        return json.loads(done.read_text()).get("fingerprint") == print_
    except (OSError, json.JSONDecodeError):
        return False


def run_stage(cfg: DictConfig, stage: str) -> tuple[float, float]:
    """Run one stage's ``run(cfg)``; returns (seconds, peak resident MiB). Fails on non-zero status."""
    run = load_stage(stage)
    if run is None:
        raise RuntimeError(f"stage {stage!r} is not built in this version")
    reset_peak_rss()
    start = time.perf_counter()
    log.info("==> %s", stage)
    code = run(cfg)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"stage {stage} failed with status {code}")
    log.info("<== %s done in %.1f s (peak memory %.0f MiB)", stage, seconds, peak_rss_mb())
    return seconds, peak_rss_mb()


def pretrain_wanted(cfg: DictConfig) -> bool:
    return bool(cfg.pretrain.enabled) and not cfg.model.weights


def run(cfg: DictConfig) -> int:
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    plan = ["proposals", "pretrain", "features", "finetune", "svm", "bboxreg"]
    for stage in plan:
        if stage == "pretrain" and not pretrain_wanted(cfg):
            why = "ImageNet weights given" if cfg.model.weights else "pretrain.enabled=false"
            results.append(StageResult(stage, f"skipped ({why})"))
            continue
        if stage == "features" or stage == "finetune":
            # later stages build the backbone from the pretrained weights when there are some
            if (work_dir / "pretrain.pt").is_file() and pretrain_wanted(cfg):
                with open_dict(cfg):
                    cfg.model.backbone_checkpoint = str(work_dir / "pretrain.pt")
        if stage in RESULT_SECTIONS:
            print_ = fingerprint(cfg, stage, work_dir)
            if is_current(work_dir, stage, print_):
                results.append(StageResult(stage, "skipped (current)", artifact=str(work_dir / f"{stage}.pt")))
                log.info("%s: %s/%s.pt is current, skipped", stage, work_dir, stage)
                continue
        seconds, peak = run_stage(cfg, stage)
        artifact = str(work_dir / f"{stage}.pt") if stage in RESULT_SECTIONS else str(Path(cfg.cache_dir))
        if stage in RESULT_SECTIONS:
            write_json({"fingerprint": print_, "seconds": seconds, "peak_rss_mb": peak}, work_dir / f"{stage}.done.json")
        results.append(StageResult(stage, "ran", seconds, peak, artifact))

    from spp_det.artifact import assemble

    start = time.perf_counter()
    model_path = assemble(cfg)
    results.append(StageResult("model", "ran", time.perf_counter() - start, peak_rss_mb(), str(model_path)))
    print_summary(results)
    write_json([r.__dict__ for r in results], work_dir / "train_summary.json")
    return 0


def print_summary(results: list[StageResult]) -> None:
    lines = [f"{'stage':<10} {'status':<32} {'seconds':>8} {'peak MiB':>9}  artifact"]
    for r in results:
        secs = f"{r.seconds:8.1f}" if r.status == "ran" else f"{'-':>8}"
        peak = f"{r.peak_mb:9.0f}" if r.status == "ran" else f"{'-':>9}"
        lines.append(f"{r.stage:<10} {r.status:<32} {secs} {peak}  {r.artifact}")
    total = sum(r.seconds for r in results)
    lines.append(f"{'total':<10} {'':<32} {total:8.1f}")
    print("\n" + "\n".join(lines), flush=True)
