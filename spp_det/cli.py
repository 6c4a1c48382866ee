"""``spp-det STAGE [hydra overrides...]``: one console script for every stage.

Each stage is declared in ``spp_det.stages.STAGES`` (its module's ``run(cfg) -> int | None``, its
help line, the groups it reads, its checks); the CLI composes ``configs/config.yaml`` with Hydra
(so ``--cfg job``, ``hydra.run.dir=...`` and strict key checking work as in any Hydra app), sets
``stage``, runs the checks the declaration names, and calls it.

Mistakes get one message on stderr and an exit code, never a traceback (docs/configs.md, "Command
line and configs"): the command line is composed once here before Hydra runs, so an unknown key or option
gets the nearest names ("did you mean"), a list written without brackets gets the fix, and checks
that need no work (split files, the model file) run before Hydra makes the run directory.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from spp_det import __version__
from spp_det.config import ConfigsNotFound, compose, config_dir, config_groups, moved_key_errors, override_key
from spp_det.errors import UserError
from spp_det.stages import BY_NAME, STAGES
from spp_det.stages.declare import Stage

# Exit codes (docs/configs.md, "Command line and configs"); a stage's own non-zero status passes through.
EXIT_FAILED = 1  # the run stopped on its input or settings (a UserError: the message names the file or key)
EXIT_USAGE = 2   # the command line is wrong: unknown stage, key or option, a value of the wrong form

# Hydra options that only print something: the stage does not run.
PRINT_ONLY = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")

log = logging.getLogger("spp_det")


def user_overrides(args: list[str]) -> list[str]:
    """The key=value (and ``~key``) overrides among ``args``, without Hydra's options and their values."""
    return [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def fail(message: str, code: int) -> NoReturn:
    print(f"spp-det: {message}", file=sys.stderr)
    sys.exit(code)


def usage() -> str:
    width = max(len(s.name) for s in STAGES)
    lines = [
        "usage: spp-det STAGE [key=value ...] [--cfg job] [hydra options]",
        "",
        "SPP-net object detection. Stages:",
        *(f"  {s.name:<{width}}  {s.help}" for s in STAGES),
        "",
        "Overrides are Hydra's key=value (e.g. data.root=DIR device=cpu experiment=demo).",
        "`spp-det STAGE --help` lists what a stage reads; `spp-det STAGE --cfg job` prints its whole config.",
        "`spp-det --version` prints the version.",
    ]
    return "\n".join(lines)


def nearest(word: str, names) -> str:
    """`` (did you mean X or Y?)`` for the closest of ``names`` (difflib), or ``""``."""
    near = difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def flat_keys(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a plain nested dict: ``data``, ``data.root``, ..."""
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += flat_keys(value, f"{prefix}{key}.")
    return keys


def explain_composition_error(exc: Exception, stage: str, overrides: list[str]) -> str:
    """Hydra's composition error as one message a user can act on: the nearest key or option."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    text = str(exc).split("\nConfig search path:")[0].strip()
    if isinstance(exc, OverrideParseException):  # Hydra does not say which override it could not read
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_override(override)
            except HydraException:
                return (f"cannot read {override!r} ({text.splitlines()[0]}): lists are [a,b], values with "
                        "spaces or brackets are quoted ('key=\"a b\"'); Hydra's override grammar: --hydra-help")
    unknown_key = re.match(r"Could not override '([^']+)'", text)
    if unknown_key and isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        key = unknown_key.group(1)
        keys = flat_keys(OmegaConf.to_container(compose(stage, []), resolve=False))
        if key in keys:  # the key exists: its new value brings a key the config does not have (e.g. a dict)
            return (f"cannot set {key}: {exc.__cause__}".splitlines()[0] + f"; a new key inside it is added with "
                    f"+{key}.NAME=VALUE")
        return (f"unknown key {key}{nearest(key, keys)}; `spp-det {stage} --help` lists the common keys, "
                f"`spp-det {stage} --cfg job` all of them")
    missing_option = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        return f"{group}={option}: no such option{nearest(option, options)}; {group} options: {', '.join(options)}"
    return text


def unbracketed_lists(stage: str, overrides: list[str], cfg) -> list[str]:
    """One message per ``key=value`` whose key holds a list and whose value is not one
    (``data.classes=raccoon`` would otherwise be read as the letters r, a, c, ...)."""
    from omegaconf import ListConfig, OmegaConf

    candidates = [o for o in overrides if "=" in o and not o.startswith("~")
                  and not o.split("=", 1)[1].strip().startswith(("[", "null"))]
    if not candidates:
        return []
    groups = set(config_groups())
    # the lists as the chosen groups and presets give them, before the user's values
    base = compose(stage, [o for o in overrides if override_key(o) in groups])
    messages = []
    for override in candidates:
        key, value = override_key(override), override.split("=", 1)[1]
        given = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        expected = OmegaConf.select(base, key, default=None, throw_on_resolution_failure=False)
        if isinstance(expected, ListConfig) and not isinstance(given, ListConfig):
            messages.append(f"{key} is a list: write '{key}=[{value}]' (brackets, commas between items, "
                            "quoted for the shell)")
    return messages


def preflight(stage: Stage, cfg) -> None:
    """Checks that need no work, before Hydra makes the run directory, as the stage declares them: the
    settings of every group it reads (complete and valid: spp_det.settings), the dataset's split
    files (no image in two of train / val / test, no empty split) and the model file it loads
    (none when ``eval.results_dir`` scores existing result files)."""
    from omegaconf import OmegaConf

    from spp_det.settings import RunSettings, check_groups

    check_groups(cfg, stage.groups)
    if stage.split_check:
        from spp_det.data.voc import check_splits

        check_splits(RunSettings.of(cfg).data, training="train" in stage.splits)
    if stage.needs_model and not OmegaConf.select(cfg, f"{stage.name}.results_dir", default=None):
        from spp_det.stages.detect import checkpoint_path

        checkpoint_path(RunSettings.of(cfg), stage.name)


def output_locations(stage: Stage, cfg) -> list[tuple[str, str, bool]]:
    """``(folder, what, own)`` for every place ``stage`` writes (its declaration), checked before any
    work; ``own``: a folder only spp-det writes (not the user's dataset), cleared of killed runs' temporaries."""
    from omegaconf import OmegaConf

    run_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None, throw_on_resolution_failure=False)
    places = [(run_dir or str(cfg.work_dir), "the run's log directory (hydra.run.dir)", True)]
    if stage.lock:
        places.append((str(cfg.work_dir), "the stage artifacts (work_dir)", True))
    if stage.caches:
        places.append((str(cfg.cache_dir), "the proposals and conv5 caches (cache_dir)", True))
    for folder in stage.writes:
        value = OmegaConf.select(cfg, folder.key, default=None)
        if value:
            places.append((str(Path(str(value)).parent if folder.parent else value), folder.what, folder.own))
    return places


def claim_outputs(stage: Stage, cfg, args: list[str]):
    """Before any work: every output location writable, the work_dir lock of a training stage (rank 0
    under torchrun), and the temporaries of killed runs cleared from spp-det's own folders. Returns
    the held lock (None when the stage takes none)."""
    from spp_det import io
    from spp_det.artifact import RUN_LOCK

    places = output_locations(stage, cfg)
    for folder, what, _ in places:
        io.check_writable(folder, what)
    lock = None
    if stage.lock and int(os.environ.get("RANK", "0")) == 0:
        lock = io.lock_folder(cfg.work_dir, RUN_LOCK, " ".join(["spp-det", stage.name, *args]))
    for folder, _, own in places:
        if own and Path(folder).is_dir():
            io.remove_stale_temporaries(folder)
    return lock


def with_overrides(args: list[str], added: list[str]) -> list[str]:
    """``args`` with the ``added`` key=value overrides next to the user's own. Hydra's argparse takes
    the overrides only as one run of positionals, so ours go before the first of the user's (or at
    the end when there is none): ``--cfg job`` then works before or after them."""
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [*args[:first], *added, *args[first:]]


def remove_if_no_work(run_dir: Path, work_dir: Path) -> bool:
    """Remove a failed run's stamped directory when it holds nothing but what Hydra writes at the
    start (``.hydra/`` and the job log), and the folders above it inside ``work_dir`` once empty:
    failed commands leave no trail of empty run folders. True when removed."""
    from spp_det.artifact import RUN_LOCK

    if not run_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if not parent.is_relative_to(work_dir) or any(p.name != RUN_LOCK for p in parent.iterdir()):
            break
        (parent / RUN_LOCK).unlink(missing_ok=True)  # this run's own lock: held until the process ends
        parent.rmdir()
    return True


def log_to_files(message: str) -> None:
    """``message`` as an ERROR record in the run's log file only (the console got it on stderr)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def launch(processes: int, argv: list[str]) -> int:
    """Run this command in ``processes`` processes of this machine, as ``torchrun --standalone
    --nproc_per_node=N -m spp_det ...`` would (torch's own launcher: each process takes a share of the
    images and rank 0 writes every output, ``spp_det.distributed``); the first failed process's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "spp_det", *argv]))
    except ChildFailedError as exc:
        return next((f.exitcode for f in exc.failures.values() if f.exitcode), EXIT_FAILED)
    return 0


def main(argv: list[str] | None = None) -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: one set of progress bars, rank 0's
        os.environ.setdefault("TQDM_DISABLE", "1")  # (read when tqdm is imported: before any stage module)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        fail(f"no stage given\n\n{usage()}", EXIT_USAGE)
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    if argv[0] in ("-V", "--version", "version"):
        print(f"spp-det {__version__}")
        sys.exit(0)
    name, args = argv[0], argv[1:]
    if name not in BY_NAME:
        fail(f"unknown stage {name!r}{nearest(name, BY_NAME)}\n\n{usage()}", EXIT_USAGE)
    stage = BY_NAME[name]
    if stage.plain:  # reads files a run wrote: no config to compose
        sys.exit(stage.function()(args))
    overrides = user_overrides(args)
    moved = moved_key_errors(overrides)
    if moved:
        fail("\nspp-det: ".join(moved), EXIT_USAGE)
    try:
        config_dir()
    except ConfigsNotFound as exc:
        fail(str(exc), EXIT_USAGE)

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:  # composed here first: Hydra's own errors would name no alternative (and print a traceback for some)
        cfg = compose(name, overrides, hydra=True)
    except (HydraException, OmegaConfBaseException) as exc:
        fail(explain_composition_error(exc, name, overrides), EXIT_USAGE)
    wrong_lists = unbracketed_lists(name, overrides, cfg)
    if wrong_lists:
        fail("\nspp-det: ".join(wrong_lists), EXIT_USAGE)
    if any(a in ("-h", "--help") for a in args):
        from spp_det.cli_help import stage_help

        print(stage_help(stage, cfg))
        sys.exit(0)
    if "--hydra-help" in args:
        from spp_det.cli_help import HYDRA_HELP

        print(HYDRA_HELP.format(stage=name))
        sys.exit(0)
    print_only = any(a in PRINT_ONLY for a in args)
    run = None if print_only else stage.function()  # the stage module imports torch: not to print a config
    if not print_only:
        try:
            preflight(stage, cfg)
            lock = claim_outputs(stage, cfg, args)  # noqa: F841 (held until the process ends)
        except UserError as exc:
            fail(str(exc), EXIT_FAILED)

    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def hydra_main(cfg: DictConfig) -> None:
        from spp_det.runtime import run_dir

        try:
            code = run(cfg)
        except (UserError, OmegaConfBaseException) as exc:  # a mistake in the input or settings: no traceback
            print(f"spp-det {name}: {exc}", file=sys.stderr)
            if not remove_if_no_work(run_dir().resolve(), Path(cfg.work_dir).resolve()):
                log_to_files(str(exc))
            sys.exit(EXIT_FAILED)
        if code:
            sys.exit(int(code))

    # the run's own record of what its command line set (command_line of spp_det.settings.RunSettings)
    added = [f"stage={name}", "command_line=[" + ",".join(f"'{override_key(o)}'" for o in overrides) + "]"]
    if print_only:
        sys.argv = [f"spp-det {name}", *with_overrides(args, added)]
        hydra_main()
        return
    from omegaconf import OmegaConf

    # a stage whose group has `processes` (eval, detect) starts them itself, unless a launcher already did
    processes = OmegaConf.select(cfg, f"{name}.processes", default=1)
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(launch(processes, argv))
    from spp_det import distributed  # here: it imports torch (1.5 s), which help and --cfg do without

    if distributed.init():  # under torchrun: one process group; every rank uses rank 0's run directory stamp
        from datetime import datetime

        stamp = distributed.all_gather(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))[0]
        os.environ.setdefault("SPP_DET_RUN_STAMP", stamp)  # configs/config.yaml hydra.run.dir
        if not distributed.is_main():
            added.append("hydra.output_subdir=null")  # rank 0 writes the run's .hydra/ config files
    sys.argv = [f"spp-det {name}", *with_overrides(args, added)]
    try:
        hydra_main()
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
