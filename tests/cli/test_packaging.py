"""The version, the licence and what the source distribution ships."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import redcredit
from redcredit.cli import Exit
from tests.cli.running import clean_env, run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_version_comes_from_the_project_metadata() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert redcredit.__version__ == importlib.metadata.version("redcredit") == declared
    assert "__version__" in redcredit.__all__
    done = run_cli("--version", env=clean_env())
    assert done.returncode == Exit.OK
    assert done.stdout.strip() == f"redcredit {declared}"


def test_the_licence_is_the_mit_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) redcredit developers" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert set(project["urls"]) == {"Homepage", "Source", "Issues", "Documentation"}


def test_the_sdist_ships_docs_lua_and_the_licence(tmp_path: Path) -> None:
    # Without isolation: the dev extra brings the build backend, so no network is needed.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (archive,) = tmp_path.glob("redcredit-*.tar.gz")
    with tarfile.open(archive) as sdist:
        top = f"redcredit-{redcredit.__version__}/"
        names = {name.removeprefix(top) for name in sdist.getnames()}
        metadata = sdist.extractfile(f"{top}PKG-INFO")
        assert metadata is not None
        pkg_info = metadata.read().decode()
    assert {"LICENSE", "README.md", "pyproject.toml"} <= names
    assert {path.name for path in (ROOT / "lua").glob("*.lua")} <= {
        name.removeprefix("lua/") for name in names if name.startswith("lua/")
    }
    # Every file the README links to, docs/ included, is there.
    linked = set(re.findall(r"\]\((?!https?:)([^)#\s]+)", (ROOT / "README.md").read_text()))
    assert linked and any(link.startswith("docs/") for link in linked)
    assert linked <= names, linked - names
    # The shipped tests can run: the sync client's generator and the compose file's image.
    assert {"tools/async_to_sync.py", "Dockerfile", "docker-compose.yml"} <= names
    assert "License-File: LICENSE" in pkg_info
    assert "Project-URL: Source, https://github.com/redcredit/redcredit" in pkg_info
