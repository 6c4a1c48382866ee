"""The documentation site builds and its generated page is current.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the nav or a nav entry
without its page (mkdocs.yml, ``validation``); docs/cli.md is what scripts/gen_cli_docs.py writes from
the code now, so the CLI reference cannot go stale; the README stays a short front door.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra: make setup installs it)")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


def test_the_cli_reference_is_generated_from_the_code():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_cli_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:] + "\n(rerun: .venv/bin/python scripts/gen_cli_docs.py)"


def test_the_readme_is_short_and_links_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme)
    assert links and all((REPO / link).is_file() for link in links), [l for l in links if not (REPO / l).is_file()]
