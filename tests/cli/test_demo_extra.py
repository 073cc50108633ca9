"""``redcredit demo`` without the demo extra says which extra to install."""

from __future__ import annotations

from redcredit.cli import Exit
from tests.cli.running import clean_env, run_cli

# The CLI as installed, but with the demo extra's packages missing.
WITHOUT_THE_DEMO_EXTRA = """
import importlib.abc
import sys


class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"starlette", "uvicorn"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Missing())
from redcredit.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


def test_demo_without_the_extra_names_it() -> None:
    done = run_cli("demo", "--no-serve", env=clean_env(), code=WITHOUT_THE_DEMO_EXTRA, timeout=60)
    assert done.returncode == Exit.MISSING_EXTRA, done.stderr
    message = done.stderr.strip()
    assert message.startswith("redcredit: redcredit demo needs "), message
    assert message.endswith(", which the demo extra installs: pip install 'redcredit[demo]'")
    assert message.split()[4].rstrip(",") in {"starlette", "uvicorn"}
    assert done.stdout == ""


def test_other_commands_do_not_need_the_extra() -> None:
    done = run_cli("--version", env=clean_env(), code=WITHOUT_THE_DEMO_EXTRA)
    assert done.returncode == Exit.OK, done.stderr
