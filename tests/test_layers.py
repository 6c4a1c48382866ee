"""The layer contract (.importlinter, run by import-linter) holds, and docs/ARCHITECTURE.md draws it."""
from __future__ import annotations

import ast
import configparser
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def contract_layers() -> list[str]:
    """The layers of the ``layers`` contract, top first, as written in .importlinter."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    return [line.strip() for line in parser["importlinter:contract:layers"]["layers"].splitlines() if line.strip()]


def test_the_import_contract_holds():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_architecture_picture_is_the_contract():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    picture = doc.split("## Layers", 1)[1].split("```", 2)[1]
    # a layer's line starts at column 0 with its packages; lines indented below it describe them
    drawn = [re.split(r"\s{2,}", line.strip())[0] for line in picture.splitlines() if line and not line[0].isspace()]
    assert drawn == contract_layers()


def test_every_stage_module_is_in_the_stage_layer():
    from spp_det.stages import STAGES

    assert "stages" in contract_layers()
    for stage in STAGES:
        assert stage.module_name.startswith("spp_det.stages."), (stage.name, stage.module_name)
        assert callable(stage.function()), stage.name


def test_weights_are_loaded_into_networks_only_by_model_weights():
    """``spp_det/model/weights.py`` is the one place a file's weights go into a network; the other
    ``load_state_dict`` calls restore what the same run holds (a resumed loop, a kept snapshot)."""
    allowed = {"spp_det/model/weights.py": None,
               "spp_det/io.py": 1,                 # load_torch: the weights_only reader of every cache and artifact
               "spp_det/training/loop.py": 2,      # resume: the loop's own module and optimizer state
               "spp_det/stages/finetune.py": 2}    # the best validation snapshot, kept in memory
    for path in sorted((ROOT / "spp_det").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        calls = sum(1 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute) and (node.func.attr in ("load_state_dict", "load_file")
                                                                  or ast.unparse(node.func) == "torch.load"))
        if name in allowed:
            assert allowed[name] is None or calls == allowed[name], (name, calls)
        else:
            assert calls == 0, f"{name} loads weights itself: use spp_det.model.weights (read_checkpoint, load_state)"


def test_docs_and_comments_name_files_and_modules_that_exist():
    """Every ``spp_det/...``, ``docs/...``, ``configs/...``, ``scripts/...``, ``tests/...`` path and every dotted
    ``spp_det.<module>`` name in the docs, configs, code and tests points at something in this repository."""
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".importlinter", *ROOT.glob("docs/*.md"),
             *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("spp_det/**/*.py"), *ROOT.glob("scripts/*"),
             *ROOT.glob("tests/*.py")]
    path = re.compile(r"(?<![\w/.])((?:spp_det|docs|configs|scripts|tests)/[\w./-]*\w)")
    dotted = re.compile(r"(?<![\w.])(spp_det(?:\.\w+)+)")
    missing = []
    for file in files:
        text = file.read_text(errors="ignore")
        missing += [f"{file.relative_to(ROOT)}: {p}" for p in path.findall(text) if not (ROOT / p.rstrip(".")).exists()]
        for name in set(dotted.findall(text)):
            parts = name.split(".")
            for i in range(len(parts), 1, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    obj = getattr(obj, attr, None)
                break
            else:
                obj = None
            if obj is None:
                missing.append(f"{file.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)
