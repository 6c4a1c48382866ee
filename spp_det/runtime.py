"""Device and parallelism settings shared by every stage."""
from __future__ import annotations

import os

import torch

from spp_det.distributed import local_world_size
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
    """Worker processes: ``0``/``None`` means all cores (under torchrun: this machine's cores
    divided among its ranks, each of which starts its own workers)."""
    if setting:
        return int(setting)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size())


def search_workers(setting: int | None) -> int:
    """Proposal worker processes beside the network (``detect``, ``eval``): half of ``num_workers``
    (at least 1); the network runs on the rest (``ProposalPrefetcher`` sets torch's threads)."""
    return max(1, num_workers(setting) // 2)


def run_dir() -> "Path":
    """This run's stamped output directory (Hydra's ``hydra.run.dir``), or the current directory
    when a stage is called as a plain function (tests, ``train``) outside a Hydra job."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (Linux ``clear_refs``), so the next
    ``peak_rss_mb`` measures one stage. Silently does nothing where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
