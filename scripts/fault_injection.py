#!/usr/bin/env python
"""Kill ``spp-det train`` with SIGKILL at random points of every stage, resume, and compare.

    python scripts/fault_injection.py --root /tmp/faults --kills 24 [--seed 0]

On a tiny synthetic config (pretraining crops+windows, finetune, svm, bboxreg; one thread, so two
uninterrupted runs give the same bits):

1. an uninterrupted reference run (its own work and cache directories), timing each stage;
2. an interrupted run: for every stage in turn, ``--kills / 6`` times, ``spp-det train`` is started
   (resuming whatever the killed runs left), and killed with SIGKILL (its whole process group) at a
   random moment of that stage (uniform over 0.6 x what the killed runs have not yet spent of the
   reference run's duration of the stage, counted from the stage's "==> stage" log line: stage
   times vary with the load on the machine; a kill that comes after the stage ended lands in a
   later one and is counted there); after every kill
   each file the run left is loaded
   (``work_dir/*.pt``, proposals and conv5 cache entries): one that does not load is *corrupt*;
3. the interrupted run is resumed to the end, and every tensor of every stage artifact
   (``pretrain*.pt``, ``finetune.pt``, ``svm.pt``, ``bboxreg.pt``, ``model.pt``) and every cache entry
   is compared with the reference run's.

Prints kills per stage (the stage that was running when the signal came), the corrupt files, and
per artifact the tensors that differ with their largest relative difference; writes it all to
``ROOT/fault_injection.json``. Exit status 1 when a file was corrupt or an artifact differs by more
than ``--svm-tolerance`` (SVMs) or at all (everything else).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from spp_det.stages import STAGES as DECLARED

STAGES = tuple(s.name for s in DECLARED if s.in_train)  # spp-det train's stages, in its order
# ref16-sized: ZF-5 at width 1/8, two tiny scales, a few epochs and iterations, checkpoints often
TINY = ["experiment=demo_zf5", "device=cpu", "num_workers=1", "synth.num_images=24", "synth.pretrain_images=40",
        "model.width=0.125", "model.fc_dim=64", "model.scales=[96,128]", "model.max_size=200",
        "pretrain.epochs=2", "pretrain.sizes=[48,32]", "pretrain.iterations=30", "pretrain.iteration_lr_steps=[20]",
        "pretrain.windows_per_image=32", "pretrain.log_every=10", "finetune.iterations=40", "finetune.val_every=20",
        "finetune.checkpoint_every=10", "finetune.batch_size=32", "finetune.lr_steps=[30]", "svm.retrain_limit=50"]


def spp_det(root: Path, run: str, stage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spp_det", stage, *TINY, f"data.root={root / 'synth'}",
            f"cache_dir={root / run / 'cache'}", f"work_dir={root / run / 'work'}",
            f"hydra.run.dir={root / run / 'logs'}", *extra]


def start(root: Path, run: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(spp_det(root, run, "train"), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=root, start_new_session=True)


def running_stage(log: Path) -> str | None:
    """The stage whose "==> stage" line came last in ``log`` (None before the first)."""
    marks = [line.rsplit("==> ", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
             if "==> " in line]
    return marks[-1] if marks else None


def reference(root: Path) -> dict[str, float]:
    """The uninterrupted run; returns each stage's seconds (train_summary.json)."""
    proc = start(root, "reference", root / "reference.log")
    if proc.wait() != 0:
        sys.exit(f"reference run failed: see {root / 'reference.log'}")
    summary = json.loads((root / "reference" / "work" / "train_summary.json").read_text())
    return {r["stage"]: float(r["seconds"]) for r in summary if r["stage"] in STAGES}


def kill_during(root: Path, stage: str, seconds: float, rng: random.Random, n: int) -> tuple[str | None, float]:
    """Start the interrupted run and SIGKILL it a random moment (uniform in ``[0, seconds)``) into
    ``stage``; returns the stage running when the signal came (None when the run finished first)
    and the seconds it had spent in ``stage``."""
    log = root / f"interrupted_{n:03d}.log"
    proc = start(root, "interrupted", log)
    delay, seen = rng.uniform(0.0, seconds), None
    while proc.poll() is None:
        current = running_stage(log)
        if current == stage and seen is None:
            seen = time.monotonic()
        past = current is not None and STAGES.index(current) > STAGES.index(stage)
        if (seen is not None and time.monotonic() - seen >= delay) or past:
            current = running_stage(log)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return current, (time.monotonic() - seen if seen is not None else 0.0)
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit(f"interrupted run failed by itself: see {log}")
    return None, 0.0


def files(run_dir: Path) -> dict[str, Path]:
    """The artifacts and cache entries of a run, by path relative to it (temporary files excluded)."""
    found = {}
    for sub, pattern in (("work", "*.pt"), ("cache/proposals", "*.npy"), ("cache/conv5", "*.pt")):
        for p in (run_dir / sub).rglob(pattern):
            if not p.name.startswith("."):
                found[str(p.relative_to(run_dir))] = p
    return found


def load(path: Path):
    return np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)


def corrupt_files(run_dir: Path) -> list[str]:
    bad = []
    for name, path in files(run_dir).items():
        try:
            load(path)
        except Exception as exc:  # a file a later run would read and fail on (or trust)
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
    return bad


def tensors(obj, prefix: str = ""):
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def compare(root: Path) -> dict[str, dict]:
    """Per file of the reference run: {"tensors", "differ", "max_rel"} against the interrupted run's."""
    ref, got = files(root / "reference"), files(root / "interrupted")
    out = {}
    for name in sorted(n for n in ref if not n.endswith("_state.pt")):
        if name not in got:
            out[name] = {"tensors": 0, "differ": ["missing"], "max_rel": math.inf}
            continue
        a, b = dict(tensors(load(ref[name]))), dict(tensors(load(got[name])))
        differ, max_rel = [], 0.0
        for key, t in a.items():
            u = b.get(key)
            if u is None or u.shape != t.shape or not torch.equal(u, t):
                differ.append(key)
                if u is not None and u.shape == t.shape and t.is_floating_point():
                    rel = float((u - t).abs().max() / t.abs().max().clamp_min(1e-12))
                    max_rel = max(max_rel, rel)
                else:
                    max_rel = math.inf
        out[name] = {"tensors": len(a), "differ": differ, "max_rel": max_rel}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="an empty or new folder for both runs")
    parser.add_argument("--kills", type=int, default=24, help="kills in all, spread evenly over the six stages")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--svm-tolerance", type=float, default=0.0, help="max relative difference of svm.pt tensors")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if (root / "reference").exists() or (root / "interrupted").exists():
        sys.exit(f"{root}: holds the runs of an earlier fault injection; give a new --root")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "synth").is_dir():
        subprocess.run(spp_det(root, "reference", "synth"), check=True, cwd=root, capture_output=True)
    seconds = reference(root)
    rng, kills, corrupt, spent = random.Random(args.seed), Counter(), [], Counter()
    for n in range(args.kills):
        stage = STAGES[n * len(STAGES) // args.kills]  # evenly over the stages, in pipeline order
        # a resumed stage has less left to do: aim within what the killed runs have not done yet
        # (at least a fifth of the stage: stages without checkpoints start over)
        left = 0.6 * max(seconds[stage] - spent[stage], 0.2 * seconds[stage])
        hit, inside = kill_during(root, stage, left, rng, n)
        spent[stage] += inside
        kills[hit or "finished"] += 1
        corrupt += corrupt_files(root / "interrupted")
        print(f"kill {n + 1}/{args.kills}: aimed at {stage}, landed in {hit}", flush=True)
    proc = start(root, "interrupted", root / "interrupted_final.log")
    if proc.wait() != 0:
        sys.exit(f"the resumed run failed: see {root / 'interrupted_final.log'}")
    diffs = compare(root)
    report = {"kills": dict(kills), "corrupt": corrupt, "stage_seconds": seconds, "artifacts": diffs}
    (root / "fault_injection.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"kills per stage: {dict(kills)}; corrupt files: {len(corrupt)}")
    for name, d in diffs.items():
        if d["differ"] or not name.startswith("cache/"):
            print(f"  {name}: {d['tensors']} tensors, {len(d['differ'])} differ (max relative {d['max_rel']:.3g})")
    cache = [d for n, d in diffs.items() if n.startswith("cache/")]
    print(f"  cache entries: {len(cache)}, {sum(bool(d['differ']) for d in cache)} differ")
    svm_only = lambda name, d: name.endswith("svm.pt") or all(k.startswith(".svm.") for k in d["differ"])  # noqa: E731
    failed = bool(corrupt) or any(d["differ"] and not (svm_only(name, d) and d["max_rel"] <= args.svm_tolerance)
                                  for name, d in diffs.items())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
