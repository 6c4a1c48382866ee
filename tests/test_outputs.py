"""Hostile conditions for what spp-det writes (issue 30): a full disk while a cache entry, a
checkpoint or an artifact is written (a clear error, nothing half-written, the rerun completes with
the same result), one run per work_dir (a lock naming the other process; a killed holder never
blocks), and output locations that cannot be written refused before any work."""
from __future__ import annotations

import builtins
import errno
import io as stdio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spp_det import io
from spp_det.artifact import RUN_LOCK

REPO = Path(__file__).resolve().parent.parent
SPP_DET = [sys.executable, "-m", "spp_det.cli"]


REAL_OPEN = builtins.open


class FullDisk:
    """``open`` for writing under ``root`` through a disk that holds ``budget`` more bytes (None:
    unlimited): the write that passes it raises ENOSPC, as a full disk does. ``files``: ``[name, bytes]``
    of every file written, in order (``name`` without atomic_path's temporary dress)."""

    def __init__(self, monkeypatch, root: Path, budget: int | None = None):
        self.root, self.budget, self.written, self.files = str(root), budget, 0, []

        def fake_open(file, mode="r", *args, **kwargs):
            f = REAL_OPEN(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax+") and str(file).startswith(self.root):
                self.files.append([re.sub(r"^\.(.+)\.\w+-\d+\.\w+\.tmp$", r"\1", Path(file).name), 0])
                return Metered(f, self, self.files[-1])
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(stdio, "open", fake_open)  # pathlib's write_text / write_bytes

    def fill(self, budget: int | None) -> None:
        """From now on ``budget`` more bytes fit (None: unlimited)."""
        self.budget, self.written, self.files = budget, 0, []


class Metered:
    def __init__(self, f, disk: FullDisk, record: list):
        self.f, self.disk, self.record = f, disk, record

    def write(self, data):
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if self.disk.budget is not None and self.disk.written + size > self.disk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.written += size
        self.record[1] += size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.mark.parametrize("write", ["save_torch", "write_json", "npy cache entry"])
def test_a_full_disk_is_a_clear_error_leaving_no_file_and_the_rerun_writes_it(tmp_path, monkeypatch, write):
    path = tmp_path / "out" / {"save_torch": "model.pt", "write_json": "metrics.json", "npy cache entry": "a.npy"}[write]

    def do():
        if write == "save_torch":
            io.save_torch({"w": torch.arange(50_000.0)}, path)
        elif write == "write_json":
            io.write_json({"values": list(range(20_000))}, path)
        else:  # as the proposals cache writes its entries
            with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, np.zeros((2000, 4), np.float32), allow_pickle=False)

    disk = FullDisk(monkeypatch, tmp_path, budget=1000)
    with pytest.raises(io.WriteError) as error:
        do()
    assert str(error.value).startswith(f"{path}: cannot write: No space left on device (")
    assert "MiB free there); free some space" in str(error.value)
    assert not path.exists() and leftovers(tmp_path) == []  # nothing half-written
    disk.budget = None
    do()  # space again: the same call completes
    assert path.is_file() and leftovers(tmp_path) == []


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    from test_svm import tiny_setup

    return tiny_setup(tmp_path, monkeypatch)


def test_a_stage_stopped_by_a_full_disk_reruns_to_the_same_artifact(tmp_path, monkeypatch, tiny, one_thread, request):
    """The SVM stage (conv5 cache entries, training curves, svm.pt) on a disk that fills half way
    through its first, a middle and its last file: each time a WriteError naming that file, no
    temporary left, every file the full disk let through whole, and the rerun's svm.pt equal to an
    uninterrupted run's."""
    from spp_det.stages import svm as svm_stage

    from threadpoolctl import threadpool_limits

    monkeypatch.chdir(tmp_path)
    tiny.num_workers = 1  # one thread for the SVMs and BLAS: two runs give the same bits
    request.addfinalizer(threadpool_limits(1).restore_original_limits)
    reference_cfg = tiny.copy()
    reference_cfg.work_dir, reference_cfg.cache_dir = str(tmp_path / "reference"), str(tmp_path / "reference_cache")
    shutil.copytree(tmp_path / "work", tmp_path / "reference")
    disk = FullDisk(monkeypatch, tmp_path)
    assert svm_stage.run(reference_cfg) == 0
    reference, writes = io.load_torch(tmp_path / "reference" / "svm.pt"), disk.files
    assert writes[-1][0] == "svm.pt" and len(writes) >= 3, writes
    stopped = []
    for target in (0, len(writes) // 2, len(writes) - 1):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # each case from the same start
        for name in ("svm.pt", "svm_curves.png", "results.csv"):
            (tmp_path / "work" / name).unlink(missing_ok=True)
        disk.fill(sum(size for _, size in writes[:target]) + writes[target][1] // 2)
        with pytest.raises(io.WriteError, match="cannot write: No space left on device") as error:
            svm_stage.run(tiny)
        stopped.append(str(error.value).split(": cannot write")[0])
        # the file the disk filled in (cache entries computed side by side may be written in another order)
        assert Path(stopped[-1]).name in {name for name, _ in writes}, (stopped, writes)
        assert leftovers(tmp_path) == [] and not (tmp_path / "work" / "svm.pt").exists()
        for entry in (tmp_path / "cache").rglob("*.pt"):  # what the full disk let through loads whole
            io.load_torch(entry)
        disk.fill(None)
        assert svm_stage.run(tiny) == 0
        rerun = io.load_torch(tmp_path / "work" / "svm.pt")
        assert torch.equal(rerun["weight"], reference["weight"]) and torch.equal(rerun["bias"], reference["bias"])
    assert Path(stopped[-1]).name == "svm.pt", stopped
    print("a full disk stopped the svm stage writing", [Path(p).name for p in stopped])


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not unshare_available(),
                                 reason="cannot mount a size-limited tmpfs here (unshare -rm + mount not allowed)")


@needs_mount
def test_a_real_full_file_system(tmp_path):
    """A 256 KiB tmpfs (a private mount namespace): save_torch of 1 MB and a 1 MB npy cache entry are
    WriteErrors naming the file, nothing is left on the file system, and after the mount grows the same
    call writes it."""
    script = textwrap.dedent(f"""
        import subprocess, sys, torch
        from spp_det import io
        target = {str(tmp_path / 'disk' / 'work' / 'model.pt')!r}
        try:
            io.save_torch({{"w": torch.zeros(250_000)}}, target)
            print("written")
        except io.WriteError as exc:
            print("error:", exc)
        import numpy as np
        try:  # as the proposals cache writes (numpy reports a short write without an errno)
            with io.atomic_path(target.replace("model.pt", "a.npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, np.zeros(250_000, np.float32))
        except io.WriteError as exc:
            print("error:", exc)
        print("files:", sorted(p.name for p in __import__("pathlib").Path(target).parent.iterdir()))
        subprocess.run(["mount", "-o", "remount,size=4m", {str(tmp_path / 'disk')!r}], check=True)
        io.save_torch({{"w": torch.zeros(250_000)}}, target)
        print("rerun:", torch.load(target, weights_only=True)["w"].shape)
    """)
    (tmp_path / "disk").mkdir()
    (tmp_path / "write.py").write_text(script)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {tmp_path / 'disk'} "
                             f"&& {sys.executable} {tmp_path / 'write.py'}"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"error: {tmp_path}/disk/work/model.pt: cannot write: No space left on device"), lines
    assert lines[1].startswith(f"error: {tmp_path}/disk/work/a.npy: cannot write: No space left on device (a short "
                               "write: "), lines
    assert lines[2] == "files: []" and lines[3] == "rerun: torch.Size([250000])"


from conftest import spp_det_cli as cli  # `spp-det ARGS` in this process (spp_det.cli.main)


def voc_dataset(tmp_path: Path) -> list[str]:
    from conftest import write_voc

    root = write_voc(tmp_path / "voc", {f"i{n}": {"objects": [("cat", (2, 2, 20, 20), 0)]} for n in range(4)},
                     split="trainval")
    return [f"data.root={root}", "data.year=null", "data.classes=[cat]", "device=cpu"]


def test_a_second_run_on_the_same_work_dir_stops_naming_the_first_and_a_killed_one_never_blocks(tmp_path):
    work = tmp_path / "runs" / "same"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spp_det import io; "
         f"lock = io.lock_folder({str(work)!r}, {RUN_LOCK!r}, 'spp-det train name=same'); print('held', flush=True); "
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("finetune", *voc_dataset(tmp_path), "name=same", cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-2000:]
        assert (f"runs/same is in use by another spp-det run (pid {holder.pid} on " in result.stderr
                and "`spp-det train name=same`, running since" in result.stderr), result.stderr[-2000:]
        assert "Traceback" not in result.stderr and not (work / "logs").exists()  # stopped before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((work / RUN_LOCK).read_text())["pid"] == holder.pid  # the killed holder's stale file
    lock = io.lock_folder(work, RUN_LOCK, "spp-det train name=same")  # does not block
    assert json.loads((work / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_an_output_place_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("a file where work_dir should be")
    result = cli("finetune", *voc_dataset(tmp_path), f"work_dir={tmp_path / 'taken' / 'run'}",
                 f"hydra.run.dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{tmp_path}/taken/run: cannot hold the stage artifacts (work_dir): {tmp_path}/taken is a file" in result.stderr
    assert not (tmp_path / "logs").exists()


@needs_mount
def test_a_read_only_output_folder_is_refused_before_the_model_loads(tmp_path):
    """detect into a read-only file system (read-only even for root): refused with the folder and the
    reason before the model is read (model.pt here is not even a model)."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "model.pt").write_bytes(b"not read")
    command = " ".join([*SPP_DET, "detect", f"detect.source={tmp_path / 'photos'}", f"detect.checkpoint={tmp_path}/model.pt",
                        f"detect.output={tmp_path / 'ro' / 'out'}", f"hydra.run.dir={tmp_path / 'logs'}", "device=cpu"])
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {tmp_path / 'ro'} && {command}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (f"{tmp_path}/ro/out: cannot hold the detections (detect.output): {tmp_path}/ro is not writable "
            "(Read-only file system)") in result.stderr


def test_temporaries_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    dead_pid = int(dead.communicate()[0])
    host = io._HOST
    (tmp_path / "sub").mkdir()
    names = {"dead": f".a.npy.{host}-{dead_pid}.0123456789ab.tmp", "live": f".b.npy.{host}-{os.getpid()}.0123456789ab.tmp",
             "other host": f".c.npy.otherhost-{dead_pid}.0123456789ab.tmp", "not ours": "notes.tmp"}
    for name in names.values():
        (tmp_path / "sub" / name).write_text("x")
    assert io.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(v for k, v in names.items() if k != "dead")
