"""The previous release (044d1b8, before credit buckets) beside this one, for the upgrade tests.

``release`` extracts it from git; a :class:`Deployment` runs its commands
and its traffic (``v1_driver.py``) in processes of their own, and keeps what
their calls returned moving per account.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from redcredit import Settings
from redcredit.backends.migrate import migrations
from redcredit.backends.postgres import apply_migration, prepare_migrations

__all__ = [
    "OPENING_CHAT",
    "OPENING_CREDITS",
    "RELEASE",
    "Deployment",
    "previous_release",
    "schema_at_0003",
    "upgrade_settings",
]

RELEASE = "044d1b8"
ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "support" / "v1_driver.py"
OPENING_CREDITS, OPENING_CHAT = 100, 20


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's tree, as ``git archive`` gives it."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{RELEASE}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        pytest.skip(
            f"the upgrade test extracts the previous release ({RELEASE}) from git, and this "
            f"checkout has no git history holding it (an sdist, or a shallow clone): "
            f"{found.stderr.decode().strip()}"
        )
    where = tmp_path_factory.mktemp("release")
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", RELEASE], stdout=subprocess.PIPE)
    with archive:
        subprocess.run(["tar", "-x", "-C", str(where)], stdin=archive.stdout, check=True)
    assert archive.returncode == 0
    return where


@dataclass
class Deployment:
    """One deployment's settings, and the two releases' commands against it."""

    settings: Settings
    release: Path
    workdir: Path
    moves: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    keys: list[str] = field(default_factory=list)
    # Settings both releases read from the environment alike (e.g. REDCREDIT_PLANS).
    more_env: dict[str, str] = field(default_factory=dict)

    def env(self, *, old: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
        env.pop("PYTHONPATH", None)
        s = self.settings
        env.update(
            REDCREDIT_REDIS_URL=s.redis_url or "",
            REDCREDIT_KEY_PREFIX=s.key_prefix,
            REDCREDIT_PG_SCHEMA=s.pg_schema,
            REDCREDIT_FREE_CREDITS=str(s.free_credits),
            REDCREDIT_FREE_CHAT_MESSAGES=str(s.free_chat_messages),
            REDCREDIT_SYNC_CLAIM_IDLE="1",
            REDCREDIT_SYNC_INTERVAL="0.05",
        )
        if s.database_url is not None:
            env["REDCREDIT_DATABASE_URL"] = s.database_url
        env.update(self.more_env)
        if old:
            env["PYTHONPATH"] = str(self.release)
        return env

    def old_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        # The working folder holds no redcredit: `-m` puts it first on the path.
        return subprocess.run(
            [sys.executable, "-m", "redcredit.cli", *args],
            capture_output=True, text=True, timeout=120, check=False,
            env=self.env(old=True), cwd=self.workdir,
        )  # fmt: skip

    def new_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "redcredit.cli", *args],
            capture_output=True, text=True, timeout=120, check=False,
            env=self.env(old=False), cwd=ROOT,
        )  # fmt: skip

    def driver_args(self, command: str, **options: Any) -> list[str]:
        options["release"] = str(self.release)
        return [sys.executable, str(DRIVER), command, json.dumps(options)]

    def old(self, command: str, **options: Any) -> dict[str, Any]:
        done = subprocess.run(
            self.driver_args(command, **options),
            capture_output=True, text=True, timeout=120, check=False,
            env=self.env(old=True), cwd=self.workdir,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return self.counted(done.stdout)

    def counted(self, stdout: str) -> dict[str, Any]:
        """The old code's report, its moves and keyed calls added to the deployment's."""
        document: dict[str, Any] = json.loads(stdout)
        for account, (credits, chat) in document.get("moves", {}).items():
            self.move(account, credits, chat)
        self.keys += [call["key"] for call in document.get("keyed", [])]
        return document

    def move(self, account: str, credits: int, chat: int = 0) -> None:
        self.moves[account][0] += credits
        self.moves[account][1] += chat


def upgrade_settings(url: str, prefix: str, **more: Any) -> Settings:
    options: dict[str, Any] = {
        "free_credits": OPENING_CREDITS,
        "free_chat_messages": OPENING_CHAT,
        **more,
    }
    return Settings(redis_url=url, key_prefix=prefix, **options)


def schema_at_0003(postgres_url: str, schema: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn, conn.transaction():
        prepare_migrations(conn, schema)
        for migration in migrations()[:3]:
            apply_migration(conn, schema, migration.version, migration.name, migration.text)
