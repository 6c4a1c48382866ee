"""Faults (slow): ``scripts/fault_injection.py`` kills ``spp-det train`` with SIGKILL once in each
stage, resumes, and finds no corrupt file and every resumed artifact equal to an uninterrupted
run's (the full harness: at least 20 kills, README / docs/ARCHITECTURE.md); ``eval`` and ``detect``
killed at every write of their outputs and at random moments rerun to the same files; ``train`` on a
file system that fills up stops with a clear error and, given space, resumes to the same artifacts."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# Runs `spp-det` with spp_det.io.atomic_path wrapped: every write of the main process is logged to
# $FAULT_LOG (its path relative to the working directory, one a line); the write of the file
# $FAULT_KILL_AT is killed with SIGKILL after its temporary is written (FAULT_MODE=half: cut to half
# its size first), before it is renamed into place.
KILL_AT_WRITE = """
import contextlib, os, signal, sys
from spp_det import io
main_pid, real = os.getpid(), io.atomic_path
kill_at, half = os.environ.get("FAULT_KILL_AT"), os.environ.get("FAULT_MODE") == "half"

@contextlib.contextmanager
def atomic_path(path):
    with real(path) as tmp:
        yield tmp
        if os.getpid() == main_pid:
            name = os.path.relpath(path)
            with open(os.environ["FAULT_LOG"], "a") as log:
                log.write(name + "\\n")
            if name == kill_at:
                if half:
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(main_pid, signal.SIGKILL)

io.atomic_path = atomic_path
from spp_det.cli import main
sys.argv = ["spp-det", *sys.argv[1:]]
main()
"""


def whole(path: Path) -> str | None:
    """Why ``path`` is not a whole file of its kind (None when it is)."""
    import xml.etree.ElementTree as ET

    import numpy as np
    from PIL import Image

    try:
        if path.suffix in (".json",):
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".xml":
            ET.parse(path)
        elif path.suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>"), "no </html>"
        elif path.name.startswith("comp4_det_"):
            for line in path.read_text().splitlines():
                image_id, *numbers = line.split()
                assert len(numbers) == 5 and all(float(v) == float(v) for v in numbers), line
    except Exception as exc:  # noqa: BLE001: whatever a reader would trip on
        return f"{type(exc).__name__}: {exc}"
    return None


def outputs(run: Path) -> dict[str, Path]:
    """The files a run left in its output folder and cache (relative name -> path)."""
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*")) if p.is_file() and p.name != "fault.log"
            and ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["eval", "detect"])
def test_killed_eval_and_detect_rerun_to_the_same_files(tiny_model, stage):
    """``spp-det eval`` / ``detect`` killed with SIGKILL at every write of its outputs (the temporary
    whole, or cut to half) and at random moments, then run again into the same folder: after every kill
    each file there loads whole, and the rerun leaves the same files as an uninterrupted run (metrics
    but their timings; report.html whole) and no temporary anywhere."""
    import os
    import random
    import signal
    import time

    from conftest import write_voc
    from PIL import Image

    root = tiny_model
    objects = [("disc", (10, 10, 50, 40), False), ("block", (60, 15, 100, 45), False)]
    write_voc(root / "test_voc", {f"t{i}": {"size": (128, 96), "objects": objects} for i in range(8)}, split="test")
    for i, path in enumerate(sorted((root / "test_voc" / "JPEGImages").glob("*.jpg"))):  # the shapes, moved a little
        pixels = np.full((96, 128, 3), 40, np.uint8)
        pixels[10 + i % 3:40, 10:50] = (220, 60, 60)
        pixels[15:45, 60 + i % 4:100] = (60, 60, 220)
        Image.fromarray(pixels).save(path, quality=95)
    # relative paths (each run in its own folder): the configs, and so the files that record them, are equal
    common = [f"data.root={root / 'test_voc'}", "data.year=null", "device=cpu", "proposals=opencv_fast",
              "proposals.resize_to=96", "num_workers=1", "cache_dir=cache", "hydra.run.dir=out"]
    args = {"eval": ["eval", *common, f"eval.checkpoint={root / 'runs' / 'tiny' / 'model.pt'}"],
            "detect": ["detect", *common, f"detect.checkpoint={root / 'runs' / 'tiny' / 'model.pt'}",
                       f"detect.source={root / 'test_voc' / 'JPEGImages'}", "detect.output=out",
                       "detect.format=[jsonl,coco,voc]"]}[stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(SCRIPT.parent.parent)}

    def start(run: Path, **fault) -> subprocess.Popen:
        run.mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, "-c", KILL_AT_WRITE, *args], cwd=run, start_new_session=True,
                                env={**env, "FAULT_LOG": str(run / "fault.log"), **fault},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> int:
        code = proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its proposal workers
        return code

    begun = time.monotonic()
    reference = start(root / "reference")
    assert finish(reference) == 0, reference.stderr.read()[-3000:]
    seconds = time.monotonic() - begun
    writes = (root / "reference" / "fault.log").read_text().splitlines()
    assert len(writes) >= 5, writes

    run, rng, kills, broken = root / "interrupted", random.Random(30), [], []
    for n, name in enumerate(writes):  # every file the main process writes, the temporary whole or cut in half
        proc = start(run, FAULT_KILL_AT=name, FAULT_MODE=("half" if n % 2 else "whole"))
        code = finish(proc)
        # a cache entry an earlier run wrote is not written again: that run finishes
        assert code == -signal.SIGKILL or (code == 0 and name.startswith("cache")), proc.stderr.read()[-3000:]
        kills.append("write" if code else "finished")
        broken += [f"{name}: {why}" for name, p in outputs(run).items() if not p.name.endswith(".tmp")
                   and (why := whole(p))]
    for n in range(6):  # random moments of the run
        proc = start(run)
        time.sleep(rng.uniform(0.0, seconds))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        kills.append("finished" if finish(proc) == 0 else "moment")
        broken += [f"{name}: {why}" for name, p in outputs(run).items() if not p.name.endswith(".tmp")
                   and (why := whole(p))]
    assert broken == []
    (run / "fault.log").unlink()
    final = start(run)
    assert finish(final) == 0, final.stderr.read()[-3000:]

    got, want = outputs(run), outputs(root / "reference")
    assert [name for name in got if name.endswith(".tmp")] == []  # the killed runs' temporaries are gone
    assert sorted(got) == sorted(want)
    for name, path in want.items():
        if name.endswith("metrics.json"):
            a, b = (json.loads(p.read_text()) for p in (path, got[name]))
            a.pop("seconds_per_image"), b.pop("seconds_per_image")
            assert a == b
        elif name.endswith(".html"):
            assert whole(got[name]) is None
        else:
            assert got[name].read_bytes() == path.read_bytes(), name
    print(f"{stage}: {kills.count('write') + kills.count('moment')} kills ({kills.count('write')} at writes of "
          f"{len(writes)} files, {kills.count('moment')} at random moments; {kills.count('finished')} runs finished "
          f"first); {len(want)} files equal")


def mount_allowed() -> bool:
    import shutil

    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not mount_allowed(), reason="cannot mount a size-limited tmpfs here (unshare -rm + mount)")
def test_train_on_a_filling_file_system_stops_clearly_and_resumes_to_the_same_artifacts(tmp_path):
    """``spp-det train`` (the harness's tiny config) with work_dir and cache_dir on a tmpfs (a private
    mount namespace) that fills in the proposals, in pretraining and later, then grows to room to
    spare: each full run stops with exit 1 and "No space left on device" naming a file, no traceback,
    no temporary; the last resumes, and every artifact and cache entry equals the uninterrupted run's."""
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    fi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fi)
    root = tmp_path
    subprocess.run(fi.spp_det(root, "reference", "synth"), check=True, cwd=root, capture_output=True)
    fi.reference(root)
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    # full in the proposals, in pretraining (its checkpoint holds the optimizer too), later; then room to spare
    total, proposals = size(root / "reference"), size(root / "reference" / "cache" / "proposals")
    sizes = [s // 4096 * 4096 for s in (proposals // 2, proposals + (1200 << 10), total - (512 << 10))]
    sizes.append(3 * total + (64 << 20))
    disk = root / "interrupted"
    disk.mkdir()
    train = " ".join(map(shlex.quote, fi.spp_det(root, "interrupted", "train")))
    steps = "\n".join(f"mount -o remount,size={size} {disk}\n{train} > {root}/full_{i}.log 2>&1\n"
                      f"echo $? >> {root}/codes" for i, size in enumerate(sizes))
    script = f"set -u\nmount -t tmpfs -o size={sizes[0]} tmpfs {disk}\n{steps}\ncp -a {disk}/. {root}/kept\n"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, cwd=root, env=env, timeout=3000)
    codes = (root / "codes").read_text().split()
    logs = [(root / f"full_{i}.log").read_text() for i in range(len(sizes))]
    assert codes == ["1", "1", "1", "0"], [log[-2000:] for log in logs]
    for log in logs[:3]:
        assert "cannot write: No space left on device" in log and "Traceback" not in log, log[-3000:]
    disk.rmdir()
    (root / "kept").rename(disk)
    assert [p.name for p in disk.rglob("*.tmp")] == []
    diffs = fi.compare(root)
    assert {"work/finetune.pt", "work/svm.pt", "work/model.pt"} <= set(diffs)
    assert all(not d["differ"] for d in diffs.values()), diffs
    stopped = [Path(log.split(": cannot write: No space")[0].rsplit(" ", 1)[-1]).name for log in logs[:3]]
    print("full file system stopped train at:", stopped, "tmpfs sizes", sizes)
    assert len(set(stopped)) >= 2, stopped  # a proposals cache entry and pretraining's checkpoint at least
