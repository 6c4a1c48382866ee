"""What each stage reads and writes, and the one rule that turns it into a settings key.

Every stage module declares a ``Stage``: the artifact it writes, the config keys it reads and the
artifacts of earlier stages it consumes. A trained stage's *settings key* (stored in its
artifact's ``meta["settings"]``; the artifact is reused while the key is unchanged, see
``spp_det.io.artifact_is_current``) is derived from that declaration by ``settings_key`` alone:

    sha1 of {stage name,
             every read key's value (a whole group minus its ``ignores`` when a group is named),
             every consumed artifact's content hash (a file's bytes; a cache's own content key)}

So a key no trained stage declares (``eval.*``, ``detect.*``, ``bench.*``, ``data.test_split``,
``proposals.export``) never retrains anything, and a key a stage reads always reruns it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from spp_det.io import hash_file, hash_settings
from spp_det.proposals.cache import settings_key as proposals_settings

# the data keys a detection training stage reads: the data group but its test split (eval's) and
# the opt-out of the split check (the CLI's, before any work: it changes no result)
TRAINING_DATA = ("data",)
NOT_TRAINING_DATA = ("data.test_split", "data.allow_split_overlap")


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    ``artifact``: what it writes (a file in ``work_dir``, or ``cache_dir/<name>`` for a content-keyed
    cache, or a file in the run directory); ``reads``: config keys (``"group"`` = every key of the
    group, ``"group.key"`` one key); ``ignores``: keys inside a read group that do not change the
    artifact; ``consumes``: names of the earlier artifacts whose content changes the result.
    """

    name: str
    artifact: str
    reads: tuple[str, ...]
    consumes: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    paper: str = ""  # where the paper describes the step (docs/ARCHITECTURE.md)

    @property
    def cache(self) -> bool:
        """Whether the artifact is a content-keyed cache (``cache_dir/<name>/``), not a file in ``work_dir``."""
        return self.artifact.startswith("cache_dir/")

    def path(self, cfg: DictConfig) -> Path:
        """Where a training stage's artifact lies: ``cache_dir/<name>`` or ``work_dir/<file>``."""
        if self.cache:
            return Path(cfg.cache_dir) / self.artifact.removeprefix("cache_dir/").rstrip("/")
        return Path(cfg.work_dir) / self.artifact


def _value(cfg: DictConfig, key: str, ignores: tuple[str, ...]):
    """The resolved value of ``key`` as plain data, without the ``ignores`` inside it (None when unset)."""
    value = OmegaConf.select(cfg, key, default=None)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        for ignored in ignores:
            if ignored.startswith(key + "."):
                value.pop(ignored[len(key) + 1:], None)
    return value


def content_hash(artifact: str | Path | None) -> str | None:
    """A consumed artifact's content: a file's SHA-1, or (a ``str`` that is no file) a cache's own
    content key as given; None when the stage consumes nothing there (e.g. a random backbone)."""
    if artifact is None:
        return None
    if isinstance(artifact, Path):
        return hash_file(artifact)
    return str(artifact)


def proposals_cache(proposals_cfg) -> str | None:
    """The content key of the proposals cache the ``proposals`` settings fill (every setting that
    changes the boxes, nothing that only says where they go; with ``backend=precomputed`` the boxes
    file's bytes); None when ``proposals_cfg`` is None."""
    if proposals_cfg is None:
        return None
    key = proposals_settings(proposals_cfg)
    if key["backend"] == "precomputed" and proposals_cfg["file"] and Path(proposals_cfg.file).is_file():
        key["file"] = hash_file(proposals_cfg.file)
    return hash_settings(key)


def settings(cfg: DictConfig, stage: Stage, consumed: Mapping[str, str | Path | None] | None = None) -> dict:
    """What ``settings_key`` hashes (see the module docstring). ``consumed`` maps every name in
    ``stage.consumes`` to the artifact actually used (a ``Path``, a cache key, or None)."""
    consumed = dict(consumed or {})
    if set(consumed) != set(stage.consumes):
        raise ValueError(f"stage {stage.name} consumes {sorted(stage.consumes)}, got {sorted(consumed)}")
    return {"stage": stage.name,
            "reads": {key: _value(cfg, key, stage.ignores) for key in stage.reads},
            "consumes": {name: content_hash(consumed[name]) for name in stage.consumes}}


def settings_key(cfg: DictConfig, stage: Stage, consumed: Mapping[str, str | Path | None] | None = None) -> str:
    """The stage's settings key: a short hash of ``settings(cfg, stage, consumed)``."""
    return hash_settings(settings(cfg, stage, consumed))


def table_row(stage: Stage) -> str:
    """The stage's row of the stage table in docs/ARCHITECTURE.md (a test keeps the two equal)."""
    reads = ", ".join(f"`{k}`" for k in stage.reads)
    if stage.ignores:
        reads += " except " + ", ".join(f"`{k}`" for k in stage.ignores)
    consumes = ", ".join(stage.consumes) or "-"
    return f"| {stage.name} | `{stage.artifact}` | {reads} | {consumes} | {stage.paper} |"
