"""One resumable step loop for every training phase: crop pretraining (a step = an epoch), window
pretraining (a step = a block of ``log_every`` iterations) and fine-tuning (a step = a mini-batch).

Each step ``s`` (0-based) is seeded from ``(seed, s)`` alone: the loop seeds torch's global
generator (dropout masks; each rank its own under ``torchrun``) and hands the step a numpy
``Generator`` seeded with ``[seed, s]`` (window sampling), so a run resumed after step ``s`` draws
exactly what an uninterrupted one would have drawn and ends with the same weights. After every
``checkpoint_every`` steps the weights, the optimizer, the history, the torch RNG state and the
phase's own ``extra`` state go to ``state_path`` (atomically, rank 0 only); a later run with the
same ``settings`` resumes from it, another one starts over.

The learning rate follows one step schedule (``lr_at``), set by ``optimizer_step`` before each update;
a loss that is not finite stops the run with a message naming the stage's lr key.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from spp_det import distributed, io
from spp_det.errors import UserError
from spp_det.settings import OPTIMIZERS

log = logging.getLogger(__name__)

# torch's seed of step s is seed * stride + s (+ this times the rank: each rank its own dropout masks)
RANK_SEED_STRIDE = 1_000_000_007


def lr_at(step: int, lr: float, lr_steps, gamma: float) -> float:
    """Step schedule: ``lr * gamma ** (number of lr_steps <= step)`` (paper's fine-tuning: 1e-4, then
    1e-5 after 250k mini-batches)."""
    return lr * gamma ** sum(int(step >= s) for s in lr_steps)


def make_optimizer(module: nn.Module, name: str, cfg, group: str = "pretrain") -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``module``'s trainable parameters (not the fixed ones: ``frozen_convs``)
    with ``cfg``'s ``lr``, ``momentum``, ``weight_decay``: ``sgd`` is the paper's recipe; ``adam`` (not
    the paper: Adam with decoupled weight decay, AdamW) serves short from-scratch CPU runs that SGD
    makes too slow. ``group`` names the config group in errors."""
    params = [p for p in module.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=float(cfg.lr), momentum=float(cfg.momentum),
                               weight_decay=float(cfg.weight_decay))
    if name == "adam":
        return torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    raise UserError(f"{group}.optimizer={name!r}: use {' or '.join(OPTIMIZERS)}")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, stage: str, at: str,
                   knob: str) -> None:
    """One update of ``optimizer`` at learning rate ``lr`` from ``loss``. A loss that is not finite
    (an lr too high diverges) stops the run: "``stage``: the loss became nan at ``at``; lower ``knob``"."""
    if not torch.isfinite(loss):
        raise UserError(f"{stage}: the loss became {loss.item()} at {at}; lower {knob}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclasses.dataclass
class Step:
    """What a step body gets: its ``number`` (``first``, ``first + 1``, ...), ``rng`` (numpy, seeded
    ``[seed, number]``) and ``seed`` (``seed * stride + number``, the same on every rank: for a torch
    ``Generator`` of data order or augmentation)."""

    number: int
    rng: np.random.Generator
    seed: int


@dataclasses.dataclass
class StepLoop:
    """``steps`` steps of ``body(step) -> history entry | None`` training ``module`` with ``optimizer``,
    numbered from ``first`` (fine-tuning counts mini-batches from 1, pretraining epochs from 0).

    ``seed_stride`` spaces the steps' torch seeds (each phase keeps the one its artifacts were made
    with, so a release of this loop leaves earlier runs' numbers unchanged). ``extra()`` returns the
    phase's own resumable state (fine-tuning: best snapshot, smoothed loss); ``checkpoint_every``
    spaces the checkpoints (``final_checkpoint``: also after the last step). ``on_step(number, entry)``
    runs after each step and its checkpoint (tests raise from it to simulate a killed run).
    """

    name: str
    steps: int
    module: nn.Module
    optimizer: torch.optim.Optimizer
    seed: int
    seed_stride: int
    state_path: Path | None = None
    settings: str = ""
    checkpoint_every: int = 1
    final_checkpoint: bool = True
    extra: Callable[[], dict] = dict
    on_step: Callable[[int, dict | None], None] | None = None
    first: int = 0

    def resume(self) -> tuple[int, list[dict], dict]:
        """Load the checkpoint written with the same ``settings`` (and no more steps than this run
        has): returns (steps done, history so far, its ``extra`` state); (0, [], {}) without one."""
        if self.state_path is None or not self.state_path.is_file():
            return 0, [], {}
        state = io.load_torch(self.state_path)
        if state.get("settings") != self.settings or "step" not in state or int(state["step"]) > self.steps:
            log.info("%s: %s was written with other settings; starting over", self.name, self.state_path)
            return 0, [], {}
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        log.info("%s: resuming from %s after step %d of %d", self.name, self.state_path, state["step"], self.steps)
        return int(state["step"]), list(state["history"]), dict(state["extra"])

    def save(self, done: int, history: list[dict]) -> None:
        """The checkpoint ``resume`` reads (``done``: steps finished); rank 0 writes it."""
        if self.state_path is not None and distributed.is_main():
            io.save_torch({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "step": done, "history": history, "settings": self.settings,
                           "torch_rng": torch.get_rng_state(), "extra": self.extra()}, self.state_path)

    def run(self, body: Callable[[Step], dict | None], done: int = 0, history: list[dict] | None = None) -> list[dict]:
        """The steps after the first ``done`` (``done``, ``history``: from ``resume``); returns the history."""
        history = [] if history is None else history
        for number in range(self.first + done, self.first + self.steps):
            torch_seed = self.seed * self.seed_stride + number
            torch.manual_seed(torch_seed + RANK_SEED_STRIDE * distributed.rank())
            entry = body(Step(number, np.random.default_rng([self.seed, number]), torch_seed))
            if entry is not None:
                history.append(entry)
            done = number - self.first + 1
            if done % self.checkpoint_every == 0 and (done < self.steps or self.final_checkpoint):
                self.save(done, history)
            if self.on_step is not None:
                self.on_step(number, entry)
        return history
