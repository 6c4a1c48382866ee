"""Atomic writes and content keys: how every cache and artifact is written and named.

A crash never leaves a half-written file that a later run trusts: writes go to a temporary
file in the same folder and are renamed into place. Cache entries are keyed by a hash of what
produced them (file bytes, settings), never by name alone.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from spp_det.errors import UserError


class WriteError(UserError):
    """A file could not be written (disk full, read-only, no permission): names the file and the reason.
    Nothing half-written is left behind, so a rerun with space completes."""


# errno values that mean "the place cannot take the file", not a bug: the message says what to do
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(path: Path, exc: OSError) -> WriteError:
    """A ``WriteError`` naming ``path``, the reason and, for a full disk, the space left there.
    ``exc.errno`` None: a short write (numpy's ``tofile`` says only "N requested and M written")."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE or exc.errno is None:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if exc.errno is None and free is not None and free < 2**20:
            reason = f"No space left on device (a short write: {exc})"
        reason += "" if free is None else f" ({free / 2**20:.1f} MiB free there)"
        reason += "; free some space (or point cache_dir / work_dir elsewhere) and run the same command again"
    return WriteError(f"{path}: cannot write: {reason}")


# The host in temporary names: a process may remove another's temporary only when it left it on this host
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    A write that fails for want of space or permission (``ENOSPC``, ``EROFS``, ...) becomes a
    ``WriteError`` naming ``path``. A SIGKILL leaves the temporary (``.NAME.HOST-PID.TOKEN.tmp``,
    never read as ``path``); ``remove_stale_temporaries`` clears those of processes that are gone.
    The temporary file is created with mode 0o666 less the umask, as ``open(path, "w")`` would
    (``tempfile.mkstemp`` makes 0600 files, which a colleague or a web server could not read)."""
    path = Path(path)
    tmp_path = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # EXCL: never another writer's file
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as exc:
        cause = _place_error(exc)
        if cause is None:
            raise
        raise write_error(path, cause) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _place_error(exc: BaseException | None) -> OSError | None:
    """The OSError in ``exc``'s chain that says the place cannot take the file (full, read-only, no
    permission), or None. The chain, not just ``exc``: torch's zip writer answers a failed write
    with a RuntimeError of its own while closing, raised in the OSError's ``__context__``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in (*_NO_SPACE, errno.EROFS, errno.EACCES, errno.EPERM)
                                         or (exc.errno is None and " written" in str(exc))):  # a short write
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporaries ``atomic_path`` left in ``folder`` (and below) when its process was
    killed: those of this host whose process is gone. Safe while other runs write there (their
    processes live; another host's temporaries are left alone). Returns how many were removed."""
    removed = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            match = _TEMPORARY.match(name)
            if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse, before any work, a ``folder`` that cannot take ``what``: a file where a folder (or a
    folder above it) should be, a read-only file system, no permission. Probes with a file created
    and removed in the deepest folder that exists, and makes no folder (a run that stops here
    leaves nothing behind); the file-mode bits alone would not tell (root writes anyway, read-only
    mounts ignore them)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{folder}: cannot hold {what}: {existing} is a file, not a folder")
    probe = existing / f".spp-det-probe.{_HOST}-{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(f"{folder}: cannot hold {what}: {existing} is not writable ({exc.strerror})") from None


class Busy(UserError):
    """Another process holds the folder's run lock (``lock_folder``)."""


def lock_folder(folder: str | Path, lock_name: str, command: str):
    """Hold ``folder/lock_name`` (an OS file lock, ``filelock``) until this process ends, so a second
    run writing the same folder stops at once with a ``Busy`` error naming the first (pid, host,
    command, start). The operating system drops the lock of a process that ends, killed or not:
    a stale lock file never blocks. Returns the held lock (keep a reference)."""
    from datetime import datetime

    import filelock

    folder = Path(folder)
    path = folder / lock_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(path, timeout=0)
        lock.acquire()
    except filelock.Timeout:
        try:
            holder = json.loads(path.read_text())
            who = (f"pid {holder['pid']} on {holder['host']}, `{holder['command']}`, running since "
                   f"{holder['since']}")
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
            who = "a process that is starting"
        raise Busy(f"{folder} is in use by another spp-det run ({who}): wait for it to end or stop it, "
                   "or give this run another name= / work_dir=") from None
    except OSError as exc:
        raise write_error(path, exc) from None
    # the holder's description, read by the next contender (filelock never truncates a held lock file)
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                "since": datetime.now().isoformat(timespec="seconds")}) + "\n")
    return lock


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically. Save only tensors, numbers, strings, lists and dicts, so the
    file loads with ``torch.load(..., weights_only=True)``. Written through a Python file object:
    given a path, torch's own writer reports a full disk as a bare RuntimeError."""
    import torch  # here, not at the top: worker processes that only write numpy caches skip torch's import

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``: never unpickles arbitrary objects."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def hash_file(path: str | Path) -> str:
    """SHA-1 of a file's bytes (the content part of a cache key)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_settings(settings: Any) -> str:
    """Stable short hash of JSON-able settings (dicts are key-sorted)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(settings, (DictConfig, ListConfig)):
        settings = OmegaConf.to_container(settings, resolve=True)
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_meta(cfg) -> dict:
    """What a checkpoint must agree on with the config that loads it."""
    return {
        "classes": list(cfg.data.classes),
        "backbone": str(cfg.model.backbone) + (f":{cfg.model.timm_name}" if cfg.model.backbone == "timm" else ""),
        "width": float(cfg.model.width),
        "fc_dim": int(cfg.model.fc_dim),
        "pyramid_levels": [int(n) for n in cfg.model.pyramid_levels],
    }


def check_checkpoint(meta: dict, cfg, path: str | Path) -> None:
    """Refuse a checkpoint written for other classes or another network (a clear UserError)."""
    expected = checkpoint_meta(cfg)
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, config has {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise UserError(f"{path}: checkpoint was made with another configuration; " + "; ".join(diffs)
                        + ". Use a matching config or another work_dir/name.")


def artifact_is_current(path: str | Path, settings: str) -> bool:
    """True when ``path`` holds a stage artifact whose ``meta["settings"]`` equals ``settings``
    (the stage's hash of everything that changes its result). An unreadable file is not current:
    the stage trains again and replaces it atomically."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = load_torch(path).get("meta", {})
    except Exception:  # corrupt or foreign file
        return False
    return isinstance(meta, dict) and meta.get("settings") == settings
