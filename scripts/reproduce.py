"""Regenerate one results table: train and evaluate each seed with the table's commands, then write
the table's markdown rows and a JSON record beside them.

    .venv/bin/python scripts/reproduce.py raccoon            # seeds 0 1 2 (the default)
    .venv/bin/python scripts/reproduce.py voc07_cpu --seeds 0 1 2
    .venv/bin/python scripts/reproduce.py demo --out runs/reproduce

Each run is an ordinary `spp-det train` / `spp-det eval` command (printed before it runs) into
runs/<table>_s<seed>; caches that exist are reused (they are keyed by content, so a reused entry is
the entry a cold run would compute). A seed whose eval metrics already exist for the current
model.pt is not run again unless --force. Writes <out>/<table>.md (the rows pasted into the docs)
and <out>/<table>.json (processor, date, commit, the commands, per-seed and summary numbers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPP_DET = str(Path(sys.executable).parent / "spp-det")

# table -> (train arguments, eval arguments); `seed=N name=<table>_sN` is added to both.
TABLES: dict[str, tuple[list[str], list[str]]] = {
    "raccoon": (["data.root=../shared/data/raccoon", "data.classes=[raccoon]",
                 "data.train_split=train", "data.test_split=test"],
                ["data.root=../shared/data/raccoon", "data.test_split=test"]),
    "voc07_cpu": (["experiment=voc07_cpu", "data.root=../shared/data/voc2007_subset/VOCdevkit",
                   "cache_dir=data/cache_voc"],
                  ["experiment=voc07_cpu", "data.root=../shared/data/voc2007_subset/VOCdevkit",
                   "cache_dir=data/cache_voc"]),
    "demo": (["experiment=demo"], ["experiment=demo"]),
}
COLUMNS = ("AP07 with box regression", "AP07 without", "AP10", "COCO AP50", "COCO AP75", "COCO AP-small")


def processor() -> str:
    """The CPU's model name (lscpu), which the README's times depend on."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def commit() -> str:
    """HEAD's hash, with '+dirty' when the working tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return head + ("+dirty" if dirty else "")


def spp_det(args: list[str]) -> float:
    """Run one `spp-det` command from the repository root; its wall seconds."""
    print(f"\n$ spp-det {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([SPP_DET, *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def row(metrics: dict) -> list[float | None]:
    """The table's columns in % (None where eval did not compute one)."""
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    coco = metrics.get("coco") or {}
    without = metrics.get("without_bbox_reg") or {}
    return [pct(metrics["map_voc07"]), pct(without.get("map_voc07")), pct(metrics["map_voc10"]),
            pct(coco.get("AP50")), pct(coco.get("AP75")), pct(coco.get("APs"))]


def summary(values: list[float | None]) -> str:
    """'mean (min–max)' of the values that exist, '–' when none do."""
    v = [x for x in values if x is not None]
    return f"{statistics.fmean(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "–"


def markdown(table: str, seeds: list[int], rows: dict[int, list[float | None]], info: dict) -> str:
    cell = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"<!-- written by `python scripts/reproduce.py {table} --seeds {' '.join(map(str, seeds))}` -->",
             "| seed | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(cell(x) for x in rows[s]) + " |" for s in seeds]
    lines.append("| **mean (range)** | " + " | ".join(summary([rows[s][i] for s in seeds])
                                                     for i in range(len(COLUMNS))) + " |")
    minutes = [info["seeds"][str(s)]["train_minutes"] for s in seeds]
    lines.append(f"\n{info['processor']}, {info['date']}; train minutes per seed (warm caches after the first): "
                 + ", ".join("reused" if m is None else f"{m:.1f}" for m in minutes))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/reproduce", help="folder for <table>.md and <table>.json")
    parser.add_argument("--force", action="store_true", help="train and evaluate again even if metrics exist")
    args = parser.parse_args(argv)
    train_args, eval_args = TABLES[args.table]
    if args.table == "demo" and not (REPO / "data/synth/ImageSets/Main/test.txt").is_file():
        spp_det(["synth", "experiment=demo", "data.root=data/synth"])
    info = {"table": args.table, "processor": processor(), "date": datetime.date.today().isoformat(),
            "commit": commit(), "python": sys.version.split()[0], "seeds": {}}
    rows = {}
    for seed in args.seeds:
        name = f"{args.table}_s{seed}"
        run, metrics_file = REPO / "runs" / name, REPO / "runs" / name / "eval" / "metrics.json"
        train = ["train", *train_args, f"seed={seed}", f"name={name}"]
        evaluate = ["eval", *eval_args, f"seed={seed}", f"name={name}", f"hydra.run.dir=runs/{name}/eval"]
        fresh = (metrics_file.is_file() and (run / "model.pt").is_file()
                 and metrics_file.stat().st_mtime > (run / "model.pt").stat().st_mtime)
        train_s = None  # None: the seed's model and metrics were reused
        if args.force or not fresh:
            train_s = spp_det(train)  # skips the stages whose artifacts are current
            spp_det(evaluate)
        metrics = json.loads(metrics_file.read_text())
        rows[seed] = row(metrics)
        info["seeds"][str(seed)] = {"commands": [" ".join(["spp-det", *train]), " ".join(["spp-det", *evaluate])],
                                    "train_minutes": None if train_s is None else train_s / 60, "columns": dict(zip(COLUMNS, rows[seed])),
                                    "ap_voc07_per_class": metrics["ap_voc07"]}
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.table}.md").write_text(markdown(args.table, args.seeds, rows, info))
    (out / f"{args.table}.json").write_text(json.dumps(info, indent=1) + "\n")
    print((out / f"{args.table}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
