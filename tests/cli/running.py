"""Running the ``redcredit`` command as a user would: a subprocess, its own environment."""

from __future__ import annotations

import os
import subprocess
import sys


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any REDCREDIT_* variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    env.update(values)
    return env


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m redcredit.cli ARGS``, or ``python -c CODE ARGS`` to run it under a wrapper."""
    entry = ["-c", code] if code is not None else ["-m", "redcredit.cli"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
