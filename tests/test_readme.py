"""The README's and docs/*.md's commands stay true: every `spp-det` command of their ```bash blocks composes.

Each command runs through the CLI's ``main(argv)`` in this process (tests/conftest.py: spp_det_cli)
with ``--cfg job`` (composition only: no file it names needs to exist), so a renamed key, a removed
option, a moved key or a list without brackets fails here with the message a user would get.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import spp_det_cli
from spp_det.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def bash_commands(text: str) -> list[str]:
    """Each command line of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def spp_det_args(command: str) -> list[str] | None:
    """The arguments of a `spp-det ...` (or `... -m spp_det ...`) command, None for other commands."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "spp-det" or word.endswith("/spp-det") or (word == "spp_det" and words[i - 1] == "-m"):
            return words[i + 1:]
    return None


DOCS = "".join(path.read_text() for path in sorted((REPO / "docs").glob("*.md")))  # the site's pages too
INVOCATIONS = [list(args) for args in dict.fromkeys(  # each distinct command once
    tuple(args) for args in map(spp_det_args, bash_commands(README + DOCS)) if args is not None)]


def test_the_readme_has_spp_det_commands_to_check():
    stages = {args[0] for args in INVOCATIONS if args}
    assert {"synth", "train", "eval", "detect"} <= stages and len(INVOCATIONS) >= 15


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a)[:60] for a in INVOCATIONS])
def test_every_readme_command_composes(args, tmp_path):
    if not args or args[0] in ("STAGE", *(s.name for s in STAGES if s.plain)):
        pytest.skip("a placeholder or a stage without a config")
    command = args if args[0].startswith("-") or "--help" in args else [*args, "--cfg", "job"]
    result = spp_det_cli(*command, cwd=tmp_path)
    assert result.returncode == 0, f"spp-det {' '.join(args)}:\n{result.stderr[-2000:]}"
    assert result.stdout  # the config, the help or the version
    assert not (tmp_path / "runs").exists()  # composition only: nothing ran


def test_a_stale_readme_command_fails_the_check(tmp_path):
    """What the check above does with a command a change made stale: a renamed key, a moved key, a list
    without brackets, a removed option."""
    for stale in (["train", "data.rot=x"], ["eval", "model.checkpoint=m.pt"], ["train", "data.classes=raccoon"],
                  ["train", "experiment=no_such_preset"]):
        result = spp_det_cli(*stale, "--cfg", "job", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("spp-det: "), (stale, result)


def test_the_demo_section_lists_the_commands_the_demo_runs():
    demo = (REPO / "scripts" / "demo.py").read_text()
    stages = list(dict.fromkeys(re.findall(r'step\("(\w+)"', demo)))  # synth has two spellings, one runs
    section = README.split("## The demo", 1)[1]
    block = re.search(r"```bash\n.*?```", section, re.S).group(0)  # the section's first command block
    assert [args[0] for args in map(spp_det_args, bash_commands(block))] == stages
    count = {3: "three", 4: "four", 5: "five"}[len(stages)]
    assert f"prints and runs {count} ordinary commands" in section


def test_the_demo_script_runs_as_the_readme_says():
    assert "`.venv/bin/python scripts/demo.py --experiment demo_zf5`" in README
    assert os.access(REPO / "scripts" / "demo.py", os.X_OK)
    assert (REPO / "scripts" / "demo.py").read_text().startswith("#!/usr/bin/env python")
