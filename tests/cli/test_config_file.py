"""``--config``: before or after the command, and a file that gives no settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redcredit import Settings
from redcredit.cli import Exit
from tests.cli.running import clean_env, run_cli


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_before_or_after_the_command(
    where: str, pg_settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "redcredit.toml"
    # TOML's basic strings are JSON's.
    config.write_text(
        f"[redcredit]\ndatabase_url = {json.dumps(pg_settings.database_url)}\n"
        f"pg_schema = {json.dumps(pg_settings.pg_schema)}\n"
    )
    option = ("--config", str(config))
    args = (*option, "migrate") if where == "before" else ("migrate", *option)
    done = run_cli(*args, env=clean_env())
    assert done.returncode == Exit.OK, done.stderr
    assert f"schema {pg_settings.pg_schema}: migrations applied: none" in done.stdout


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("# nothing but a comment\n", "is empty"),
        ("[costs]\nchat = 1\n", "has no [redcredit] table"),
        ("[redcredt]\nfree_credits = 5\n", "has no [redcredit] table (found: redcredt)"),
    ],
    ids=["missing", "empty", "comment-only", "costs-only", "misspelt-table"],
)
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_file_without_settings_is_refused(
    content: str | None, complaint: str, where: str, tmp_path: Path
) -> None:
    config = tmp_path / "redcredit.toml"
    if content is not None:
        config.write_text(content)
    option = ("--config", str(config))
    args = (*option, "sync", "--status") if where == "before" else ("sync", "--status", *option)
    # Were the file ignored, these would be used, and fail differently.
    env = clean_env(REDCREDIT_REDIS_URL="redis://127.0.0.1:1/0")
    done = run_cli(*args, env=env)
    assert done.returncode == Exit.USAGE, done.stderr
    assert done.stderr.startswith(f"redcredit: {config}" if content is not None else "redcredit:")
    assert complaint in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_the_demo_refuses_config_after_the_command_too(tmp_path: Path) -> None:
    config = tmp_path / "redcredit.toml"
    config.write_text("[redcredit]\n")
    done = run_cli("demo", "--no-serve", "--config", str(config), env=clean_env())
    assert done.returncode == Exit.USAGE
    assert "the demo does not read --config" in done.stderr
