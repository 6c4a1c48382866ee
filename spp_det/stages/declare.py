"""The stage declarations: what the program knows about each stage, and the one settings-key rule.

A ``Stage`` (the list is ``spp_det.stages.STAGES``) carries everything the CLI, ``--help``,
``spp-det train`` and docs/ARCHITECTURE.md ask about a stage: its module, help line, config
groups, the data splits it reads, the work_dir lock, the split check, the model it loads and the
``Key`` of each artifact it writes. A ``Key`` says what an artifact depends on; a trained stage's
*settings key* (stored in its artifact's ``meta["settings"]``; the artifact is reused while the
key is unchanged, see ``spp_det.io.artifact_is_current``) is derived from it by ``settings_key``:

    sha1 of {key name,
             every read key's value (a whole group minus its ``ignores`` when a group is named),
             every consumed artifact's content hash (a file's bytes; a cache's own content key)}

So a key no trained stage declares (``eval.*``, ``detect.*``, ``bench.*``, ``data.test_split``,
``proposals.export``) never retrains anything, and a key a stage reads always reruns it. Imports
nothing heavy: the CLI reads the declarations for ``--help`` without torch.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from spp_det.io import hash_file, hash_settings

log = logging.getLogger(__name__)

# the data keys a detection training stage reads: the data group but its test split (eval's) and
# the opt-out of the split check (the CLI's, before any work: it changes no result)
TRAINING_DATA = ("data",)
NOT_TRAINING_DATA = ("data.test_split", "data.allow_split_overlap")
TRAINING_SPLITS = ("train", "val")  # the split roles (data.<role>_split) training reads


@dataclass(frozen=True)
class Key:
    """What an artifact depends on. ``artifact``: what is written (a file in ``work_dir``, or
    ``cache_dir/<name>`` for a content-keyed cache, or a file in the run directory); ``reads``:
    config keys (``"group"`` = every key of the group, ``"group.key"`` one key); ``ignores``: keys
    inside a read group that do not change the artifact; ``consumes``: names of the earlier
    artifacts whose content changes the result."""

    name: str
    artifact: str
    reads: tuple[str, ...]
    consumes: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    paper: str = ""  # where the paper describes the step (docs/ARCHITECTURE.md)

    def path(self, run) -> Path:
        """Where a training stage's artifact lies: ``cache_dir/<name>`` (a content-keyed cache) or ``work_dir/<file>``
        (``run``: the run's settings or config)."""
        if self.artifact.startswith("cache_dir/"):
            return Path(run.cache_dir) / self.artifact.removeprefix("cache_dir/").rstrip("/")
        return Path(run.work_dir) / self.artifact


def head_key(name: str, artifact: str, paper: str) -> Key:
    """The key of a head trained on the fine-tuned net (svm, bboxreg): its own group, the model and
    the training data; the fine-tuned weights' bytes (every weight comes from them) and the proposals."""
    return Key(name, artifact, reads=(name, "model", *TRAINING_DATA, "seed"), consumes=("finetune", "proposals"),
               ignores=("model.weights", "model.backbone_checkpoint", *NOT_TRAINING_DATA), paper=paper)


class Folder(NamedTuple):
    """A folder a stage writes, named by a config key (none when unset), checked before any work. ``own``: only
    spp-det writes there (killed runs' temporaries are cleared); ``parent``: the key names a file in the folder."""
    key: str
    what: str
    own: bool = True
    parent: bool = False


@dataclass(frozen=True)
class Stage:
    """One stage, as the CLI, ``--help``, ``spp-det train`` and docs/ARCHITECTURE.md see it."""

    name: str
    help: str                              # one line of ``spp-det --help``
    groups: tuple[str, ...] = ()           # config groups it reads, its own first (``--help``, checked before work)
    common: tuple[str, ...] = ()           # the overrides ``spp-det STAGE --help`` lists first
    module: str = ""                       # holding run(cfg) (main(argv) when ``plain``); default spp_det.stages.<name>
    splits: tuple[str, ...] = ()           # the split roles it reads: train, val, test (data.<role>_split)
    split_check: bool = False              # the split files are checked before any work (spp_det.data.voc.check_splits)
    lock: bool = False                     # writes work_dir's artifacts: takes its lock (one such run per work_dir)
    caches: bool = False                   # writes cache_dir (proposals, conv5)
    writes: tuple[Folder, ...] = ()        # other folders it writes
    needs_model: bool = False              # loads <name>.checkpoint (checked before work; eval.results_dir: none)
    in_train: bool = False                 # one of the stages `spp-det train` runs, in this order
    plain: bool = False                    # takes plain arguments, not Hydra overrides: main(argv) -> int
    keys: tuple[Key, ...] = ()             # what each artifact it writes depends on

    @property
    def module_name(self) -> str:
        return self.module or f"spp_det.stages.{self.name}"

    def function(self) -> Callable:
        """The stage module's ``run(cfg)`` (``main(argv)`` of a plain stage), imported now (torch)."""
        return getattr(importlib.import_module(self.module_name), "main" if self.plain else "run")

    def artifact(self, cfg: DictConfig) -> Path | None:
        """Where the artifact of a training stage lies (its first key's), None when it declares none."""
        return self.keys[0].path(cfg) if self.keys else None


class Skipped(int):
    """What a stage's ``run`` returns when it did no work: exit status 0, and why (``current``: its
    artifact's settings key is unchanged; ``pretrain.enabled=false``, ...). ``spp-det train`` reports
    ``skipped (why)``."""

    why: str

    def __new__(cls, why: str) -> "Skipped":
        skipped = super().__new__(cls, 0)
        skipped.why = why
        return skipped


def current(stage: str, artifact: Path) -> Skipped:
    """Log that ``stage``'s ``artifact`` is current and return ``Skipped("current")``."""
    log.info("%s: %s is current; skipped", stage, artifact)
    return Skipped("current")


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
    from spp_det.proposals.cache import box_settings  # cv2: not for the CLI's help

    if proposals_cfg is None:
        return None
    return hash_settings(box_settings(proposals_cfg, with_file=True))


def settings(cfg: DictConfig, key: Key, consumed: Mapping[str, str | Path | None] | None = None) -> dict:
    """What ``settings_key`` hashes (see the module docstring). ``consumed`` maps every name in
    ``key.consumes`` to the artifact actually used (a ``Path``, a cache key, or None)."""
    consumed = dict(consumed or {})
    if set(consumed) != set(key.consumes):
        raise ValueError(f"stage {key.name} consumes {sorted(key.consumes)}, got {sorted(consumed)}")
    return {"stage": key.name,
            "reads": {read: _value(cfg, read, key.ignores) for read in key.reads},
            "consumes": {name: content_hash(consumed[name]) for name in key.consumes}}


def settings_key(cfg: DictConfig, key: Key, consumed: Mapping[str, str | Path | None] | None = None) -> str:
    """The settings key of ``key``'s artifact: a short hash of ``settings(cfg, key, consumed)``."""
    return hash_settings(settings(cfg, key, consumed))


def stage_table(stages) -> str:
    """The stage table of docs/ARCHITECTURE.md (a test keeps the two equal)."""
    rows = [f"| {s.name} | `{s.module_name.replace('.', '/')}.py` | {s.help} |" for s in stages]
    return "\n".join(["| stage | module | what it does |", "|---|---|---|", *rows])


def key_table(stages) -> str:
    """The table of what each artifact depends on, in docs/ARCHITECTURE.md (a test keeps the two equal)."""
    rows = []
    for key in (k for s in stages for k in s.keys):
        reads = ", ".join(f"`{k}`" for k in key.reads)
        if key.ignores:
            reads += " except " + ", ".join(f"`{k}`" for k in key.ignores)
        rows.append(f"| {key.name} | `{key.artifact}` | {reads} | {', '.join(key.consumes) or '-'} | {key.paper} |")
    return "\n".join(["| stage | artifact | reads | consumes | paper |", "|---|---|---|---|---|", *rows])
