"""Atomic writes and content keys: how every cache and artifact is written and named.

A crash never leaves a half-written file that a later run trusts: writes go to a temporary
file in the same folder and are renamed into place. Cache entries are keyed by a hash of what
produced them (file bytes, settings), never by name alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from spp_det.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    The temporary file is created with mode 0o666 less the umask, as ``open(path, "w")`` would
    (``tempfile.mkstemp`` makes 0600 files, which a colleague or a web server could not read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # EXCL: never another writer's file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically. Save only tensors, numbers, strings, lists and dicts, so the
    file loads with ``torch.load(..., weights_only=True)``."""
    import torch  # here, not at the top: worker processes that only write numpy caches skip torch's import

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
