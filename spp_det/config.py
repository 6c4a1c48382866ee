"""The configuration as every layer sees it: where ``configs/`` is, how it is composed and the keys
that have moved (the stages are declared in ``spp_det.stages``). Imports nothing of spp_det but
``errors`` (the bottom layer, docs/ARCHITECTURE.md), so the CLI, the stages and the tests compose
the same config the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

from spp_det.errors import UserError

# Keys that moved out of the model group (only eval / detect or bench read them, so no training
# stage declares them: spp_det/stages/declare.py); the old spelling gets an error naming the new.
MOVED_KEYS = {
    "model.checkpoint": "eval.checkpoint (spp-det detect: detect.checkpoint, which defaults to it)",
    "model.test_scales": "eval.scales (spp-det detect: detect.scales, which defaults to it)",
    "model.test_max_size": "eval.max_size (spp-det detect: detect.max_size, which defaults to it)",
    "model.rcnn_context": "bench.rcnn_context",
    "model.rcnn_input": "bench.rcnn_input",
}


class ConfigsNotFound(UserError):
    """``configs/`` is not where the package expects it (a wheel without the repository)."""


def config_dir() -> Path:
    """The repository's ``configs/`` (or ``$SPP_DET_CONFIGS``)."""
    path = Path(os.environ.get("SPP_DET_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
    if not (path / "config.yaml").is_file():
        raise ConfigsNotFound(f"configs not found at {path}; install with `pip install -e .` from the repository "
                              "or set SPP_DET_CONFIGS to its configs/ folder")
    return path


def config_groups() -> list[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def override_key(override: str) -> str:
    """``data.root`` of ``data.root=x``, ``+data.root=x`` or ``~data.root``."""
    return override.split("=", 1)[0].lstrip("+~")


def moved_key_errors(overrides: list[str]) -> list[str]:
    """One message per override that spells a key of ``MOVED_KEYS`` the old way."""
    keys = [override_key(o) for o in overrides if "=" in o]
    return [f"{key} has moved: use {MOVED_KEYS[key]}" for key in keys if key in MOVED_KEYS]


def compose(stage: str, overrides: list[str], hydra: bool = False):
    """``configs/config.yaml`` composed as the CLI does (Hydra's compose API: no run directory).
    With ``hydra``, the ``hydra`` node is kept (``hydra.runtime.choices``: the group options)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"stage={stage}", *overrides], return_hydra_config=hydra)


def compose_config(overrides: list[str] | None = None, stage: str = "test"):
    """Compose ``configs/config.yaml`` like the CLI does, for tests and scripts (no run directory);
    a moved key is a ``UserError`` naming its new place."""
    moved = moved_key_errors(list(overrides or []))
    if moved:
        raise UserError("; ".join(moved))
    return compose(stage, list(overrides or []))
