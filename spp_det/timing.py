"""Seconds per step of the test procedure (``detect``, ``eval``, the detectors): one accumulator for all.

No torch here: ``eval`` imports this before it knows whether it runs a model at all.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable


@contextmanager
def timed(timings: dict[str, float] | None, step: str, sync: Callable[[], None] | None = None):
    """Add the seconds the ``with`` body takes to ``timings[step]`` (nothing when ``timings`` is None).
    ``sync`` runs before the clock stops: a CUDA caller passes ``torch.cuda.synchronize`` so the time
    of its asynchronous kernels lands on their own step."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    yield
    if sync is not None:
        sync()
    timings[step] = timings.get(step, 0.0) + time.perf_counter() - start
