"""Build-on-first-use of the fused CPU pyramid pooling kernel (``spp_cpu.cpp``).

The kernel is compiled once per machine with the system C++ compiler straight into a shared
library (no ninja, no Python headers, no pybind: it only registers ``torch.ops.spp_det.pyramid_pool``
through ``TORCH_LIBRARY``) and loaded with ``torch.ops.load_library``. The library lands in
``$SPP_DET_EXT_DIR`` (default ``$XDG_CACHE_HOME/spp_det/ext`` or ``~/.cache/spp_det/ext``) under a
name keyed by the source text, the compile command and the torch version, so an edit or a torch
upgrade rebuilds it. Concurrent first use is safe: each process compiles into its own temporary
file and renames it into place atomically (the last rename wins; all are identical).

Anything going wrong (no compiler, a compile error, a load error) logs ONE warning per process and
makes :func:`load` return ``None``, so callers fall back to the torchvision path. ``SPP_DET_NO_EXT=1``
forces that fallback without trying. A failed compile leaves ``<name>.failed`` (the compiler's
output) so later processes do not spend the compile time again; delete it to retry.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("spp_cpu.cpp")
# -O3 auto-vectorises the channel loops; no -march=native, so the cached library also runs on an
# older CPU sharing the cache dir (a home directory on a cluster). -fopenmp makes ATen's
# parallel_for (an OpenMP pragma in a header) parallel; at run time it binds to the libgomp.so.1
# torch has already loaded.
FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w"]
COMPILE_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ops": None, "compile_s": None}


def cache_dir() -> Path:
    """Where the compiled library lives: ``$SPP_DET_EXT_DIR`` or ``<user cache>/spp_det/ext``."""
    if os.environ.get("SPP_DET_EXT_DIR"):
        return Path(os.environ["SPP_DET_EXT_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spp_det" / "ext"


def disabled() -> bool:
    """``SPP_DET_NO_EXT`` set to anything but ``""``/``0``: never build or use the kernel."""
    return os.environ.get("SPP_DET_NO_EXT", "") not in ("", "0")


def _command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", str(SOURCE), "-o", str(output),
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_command(compiler, Path("out"))).encode())
    key.update(f"{torch.__version__} {platform.machine()} {platform.system()}".encode())
    return cache_dir() / f"spp_cpu_{key.hexdigest()[:16]}.so"


def _build(compiler: str, library: Path) -> float:
    """Compile into a temporary file beside ``library`` and rename it into place; returns seconds."""
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=library.stem + ".", suffix=".tmp.so", dir=library.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        done = subprocess.run(_command(compiler, Path(tmp)), capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            library.with_suffix(".failed").write_text(done.stderr)
            raise RuntimeError(f"{compiler} exited with {done.returncode}: {done.stderr[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.perf_counter() - start


def load():
    """``torch.ops.spp_det`` with ``pyramid_pool`` compiled and loaded, or ``None`` (fallback).

    The first call in a process may compile (tens of seconds, once per machine); later calls are
    free. Never raises.
    """
    if disabled():
        return None
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        try:
            compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
            if not compiler:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            library = _library_path(compiler)
            failed = library.with_suffix(".failed")
            if failed.exists():
                raise RuntimeError(f"an earlier compile failed, see {failed} (delete it to retry)")
            if not library.exists():
                log.info("compiling the fused CPU pyramid pooling kernel into %s (once per machine)", library)
                _state["compile_s"] = _build(compiler, library)
                log.info("compiled in %.1f s", _state["compile_s"])
            torch.ops.load_library(str(library))
            _state["ops"] = torch.ops.spp_det
        except Exception as error:  # any failure means the torchvision path, never a crash
            log.warning("fused CPU pyramid pooling kernel unavailable, using torchvision roi_pool "
                        "(exact, slower): %s", error)
            _state["ops"] = None
        _state["tried"] = True
        return _state["ops"]


def compile_seconds() -> float | None:
    """Seconds this process spent compiling the kernel (``None`` if it was cached or not built)."""
    return _state["compile_s"]  # type: ignore[return-value]
