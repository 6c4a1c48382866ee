"""Several processes, GPUs or machines under ``torchrun`` (torch.distributed; nothing home-made).

``torchrun --nproc_per_node=N -m spp_det STAGE ...`` starts N copies of the stage; torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous address, and
``init`` joins them into one process group (``env://``): gloo for CPU tensors and, when CUDA is
available, NCCL for GPU tensors, each process on GPU ``LOCAL_RANK``. Without torchrun (no
``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper here is the one-process identity: rank 0 of 1,
``shard`` returns everything, ``gather`` returns ``[obj]``, ``barrier`` does nothing.

How the stages use it (docs/distributed.md, "Several GPUs and machines"): per-image work takes ``shard(items)``
(proposals, features, eval, detect); the SVM and box-regression stages split their classes with
``shard``; fine-tuning and pretraining wrap their trainable layers in ``ddp`` and split each
mini-batch over the ranks; only ``is_main()`` writes artifacts, checkpoints and reports.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True under a launcher that started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when this process is in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes artifacts, checkpoints, metrics and reports."""
    return rank() == 0


def local_world_size() -> int:
    """Processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if active() else 1


def init(timeout_minutes: float = 120) -> bool:
    """Join the process group torchrun describes in the environment (``env://``); True when joined.

    ``timeout_minutes``: how long a collective waits for the slowest rank (torch's default is 10
    minutes for NCCL): one rank may still be mining an SVM class or writing a large cache entry.
    """
    if not launched() or active():
        return active()
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # so device "cuda" is this rank's GPU
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size()``-th item from position ``rank()``.

    Interleaved rather than in blocks, so ranks get a similar mix of image sizes (and of classes).
    The shares are disjoint and together hold every item once.
    """
    return list(items)[rank()::world_size()]


def barrier() -> None:
    """Wait until every rank gets here (e.g. the conv5 cache is complete before the next stage)."""
    if active():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def main_first(enabled: bool = True) -> Iterator[None]:
    """Rank 0 runs the block first, then the others (e.g. rank 0 writes a shared cache file that
    the others then read instead of writing it too)."""
    if enabled and active() and not is_main():
        barrier()
    yield
    if enabled and active() and is_main():
        barrier()


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` (gradients averaged over the ranks on
    ``backward``; parameters and buffers start as rank 0's), or ``module`` itself in one process."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def batch_share(batch: int) -> slice:
    """This rank's rows of a mini-batch of ``batch`` rows drawn identically on every rank (rows
    ``rank(), rank() + world_size(), ...``). With ``loss_scale``, DDP's gradient average over the
    ranks then equals the gradient of the whole batch's mean loss: the effective batch is the
    configured one whatever the number of processes."""
    return slice(rank(), batch, world_size())


def loss_scale(batch: int) -> float:
    """Factor turning this rank's *summed* loss into its share of the whole batch's mean, after
    DDP divides the summed gradients by ``world_size()``: ``world_size() / batch``."""
    return world_size() / batch
