"""Device and parallelism settings shared by every stage."""
from __future__ import annotations

import os

import torch

from spp_det.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def num_workers(setting: int | None) -> int:
    """Worker processes: ``0``/``None`` means all cores."""
    return int(setting) if setting else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
