"""``spp-det STAGE --help``: what a stage reads, with the comments of its YAML files, in a screenful.

The common overrides of the stage come first, then every key of the stage's own group, then the
other groups it reads by name; ``--cfg job`` prints the whole composed config. Values are those
composed from the command line given with ``--help`` (so ``spp-det eval experiment=demo --help``
shows the preset's values); comments come from the YAML files in ``configs/``.
"""
from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

HYDRA_HELP = """\
spp-det {stage} takes Hydra's key=value overrides and these Hydra options:
  --cfg job            print the composed config (--cfg hydra: Hydra's own settings, --cfg all: both)
  --cfg job -p GROUP   print one group only, e.g. -p data
  --resolve            with --cfg: resolve ${{...}} interpolations
  --info               where the configs come from and the defaults list
  hydra.run.dir=DIR    the run directory (default runs/<name>/logs/<stage>_<date>_<time>)
  +key=value / ~key    add a key that is not in the config / remove one (Hydra's override grammar)
`spp-det {stage} --help` lists the keys the stage reads."""

_KEY_LINE = re.compile(r"^([A-Za-z_]\w*):\s*(.*?)\s*(?:#\s?(.*))?$")


def yaml_comments(path: Path) -> dict[str, str]:
    """Top-level ``key: value  # comment`` lines of a YAML file -> ``{key: comment}``."""
    comments = {}
    for line in path.read_text().splitlines():
        match = _KEY_LINE.match(line)
        if match and match.group(3):
            comments.setdefault(match.group(1), match.group(3).strip())
    return comments


def group_comments(configs: Path, group: str, option: str | None) -> dict[str, str]:
    """Comments of a group's keys: the chosen option's file first, then its siblings (an option
    that extends another, as data/synth.yaml extends voc07.yaml, inherits their comments)."""
    files = sorted((configs / group).glob("*.yaml"), key=lambda p: (p.stem != option, p.stem != "default", p.stem))
    comments: dict[str, str] = {}
    for path in files:
        for key, text in yaml_comments(path).items():
            comments.setdefault(key, text)
    return comments


def show_value(cfg: DictConfig, key: str) -> str:
    """The composed value of ``key`` in override syntax (resolved; as written when it cannot be)."""
    parent, _, name = key.rpartition(".")
    if OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, name):
        return "???"
    try:
        value = OmegaConf.select(cfg, key)
    except Exception:  # an interpolation that resolves only in a run (${now:...}, ${hydra:...})
        value = OmegaConf.to_container(cfg, resolve=False)[key] if "." not in key else "?"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    # YAML spellings, as an override takes them (str() of a list quotes its strings and writes True)
    text = json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)
    text = text.replace('"', "")
    return text if len(text) <= 40 else text[:37] + "..."


def stage_help(stage, cfg: DictConfig) -> str:
    """The help of ``stage`` (a ``spp_det.stages.declare.Stage``: its help line, common overrides and groups)."""
    from spp_det.config import config_dir

    configs = config_dir()
    choices = dict(cfg.hydra.runtime.choices)
    width = shutil.get_terminal_size((100, 24)).columns
    comments = {"": yaml_comments(configs / "config.yaml")}
    groups, common = stage.groups, stage.common
    for group in {*groups, *(k.split(".")[0] for k in common if "." in k)}:
        comments[group] = group_comments(configs, group, choices.get(group))

    def line(key: str) -> str:
        group, _, name = key.rpartition(".")
        if key in choices:  # a group: which option
            options = sorted(p.stem for p in (configs / key).glob("*.yaml"))
            text, value = "options: " + ", ".join(options), str(choices[key])
        else:
            text, value = comments.get(group, {}).get(name, ""), show_value(cfg, key)
        left = f"  {key}={value}"
        left = f"{left:<34}" if len(left) < 34 else left + "  "
        out = left + text
        return out if len(out) <= width else out[: width - 3] + "..."

    own = groups[0]
    lines = [f"usage: spp-det {stage.name} [key=value ...] [--cfg job]", f"{stage.help}.", "",
             "Common overrides (current value, then what it means):",
             *(line(k) for k in common), "",
             f"Every key of {own} (configs/{own}/{choices.get(own)}.yaml; set as {own}.KEY=VALUE):",
             *(line(f"{own}.{k}") for k in cfg[own] if f"{own}.{k}" not in common), ""]
    others = ", ".join(f"{g} ({choices.get(g)})" for g in groups[1:])
    if others:
        lines += textwrap.wrap(f"Also reads the groups {others}, and device, seed, cache_dir, work_dir.", width)
    lines += [f"The whole composed config: spp-det {stage.name} [key=value ...] --cfg job (one group: --cfg job -p GROUP).",
              "Lists take brackets: 'data.classes=[cat,dog]'. Hydra's options: spp-det STAGE --hydra-help."]
    return "\n".join(lines)
