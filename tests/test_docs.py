"""Every code block of README.md and docs/*.md runs as printed, against the test servers.

The blocks read their Redis URL from ``REDCREDIT_REDIS_URL`` (falling back to
``redis://localhost:6379/0``), so each runs unchanged against the fixture
Redis, under a key prefix of its own (``REDCREDIT_KEY_PREFIX``) as if the
server were fresh. A block that mentions PostgreSQL also gets
``REDCREDIT_DATABASE_URL`` and a migrated schema of its own.

- A Python block runs alone, in a fresh interpreter, and must print or assert.
  One that serves HTTP (it defines ``app``) runs in a fresh namespace instead,
  and the test drives that app: an anonymous request is answered 401, and a
  request with the block's own bearer token (from its ``TOKENS``) passes and
  is charged.
- A shell block's commands exist and take the subcommands and options used.
- SQL runs against PostgreSQL, JSON parses.

A block that is not meant to run is preceded by ``<!-- not run: reason -->``;
one marked ``part of ...`` must appear word for word in a block of its page
that runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from redcredit import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fence may be indented (inside a list item); its closing fence has the same indentation.
_FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.MULTILINE | re.DOTALL,
)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.+?)\s*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def serves_http(self) -> bool:
        return re.search(r"^app = ", self.code, re.MULTILINE) is not None

    @property
    def needs_postgres(self) -> bool:
        return "DATABASE_URL" in self.code or "database_url" in self.code


def _blocks(page: Path) -> Iterator[Block]:
    text = page.read_text(encoding="utf-8")
    for match in _FENCE.finditer(text):
        indent = len(match["indent"])
        code = "".join(line[indent:] for line in match["body"].splitlines(keepends=True))
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = _NOT_RUN.search(before)
        yield Block(
            page=page,
            line=text.count("\n", 0, match.start()) + 1,
            lang=match["lang"],
            code=code,
            not_run=marker["reason"] if marker else None,
        )


BLOCKS = [block for page in PAGES for block in _blocks(page)]


def _of(lang: str, *, run: bool = True) -> list[Any]:
    return [
        pytest.param(block, id=block.id)
        for block in BLOCKS
        if block.lang == lang and (block.not_run is None) == run
    ]


def test_the_pages_have_blocks_and_few_are_left_out() -> None:
    python = [block for block in BLOCKS if block.lang == "python"]
    assert len(python) >= 8
    assert sum(block.not_run is not None for block in python) <= 2
    known = {"python", "sh", "sql", "json", ""}
    assert {block.lang for block in BLOCKS} <= known, "teach this test the new language"


# --- Python ----------------------------------------------------------------------------------------


@pytest.fixture
def block_env(
    request: pytest.FixtureRequest,
    block: Block,
    redis_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """The environment a block runs in: the test servers, and no REDCREDIT_* of the caller's."""
    for name in list(os.environ):
        if name.upper().startswith("REDCREDIT_"):
            monkeypatch.delenv(name)
    env = {"REDCREDIT_REDIS_URL": redis_url, "REDCREDIT_KEY_PREFIX": prefix}
    if block.needs_postgres:
        pg_settings: Settings = request.getfixturevalue("pg_settings")
        assert pg_settings.database_url is not None
        env["REDCREDIT_DATABASE_URL"] = pg_settings.database_url
        env["REDCREDIT_PG_SCHEMA"] = pg_settings.pg_schema
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.parametrize("block", _of("python"))
def test_python_block_runs(block: Block, block_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    if block.serves_http:
        asyncio.run(_drive(runpy.run_path(str(script), run_name="docs_block")))
        return
    assert "print(" in block.code or "assert " in block.code, "a block shows what it did"
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stderr}"
    assert done.stdout.strip() or "print(" not in block.code


async def _drive(namespace: dict[str, Any]) -> None:
    """An anonymous chat request is refused with 401; the block's own user is let in and charged."""
    app, client, tokens = namespace["app"], namespace["client"], namespace["TOKENS"]
    token, account = next(iter(tokens.items()))
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://docs.test") as http:
            anonymous = await http.post("/v1/chat", content="hello there")
            assert anonymous.status_code == 401, anonymous.text
            assert anonymous.headers["content-type"] == "application/problem+json"
            assert anonymous.json()["type"].endswith("unidentified")

            before = await client.balance(account)
            paid = await http.post(
                "/v1/chat",
                content="tell me a story",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert paid.status_code == 200, paid.text
            after = await client.balance(account)
        assert after.chat_messages == before.chat_messages - 1
        assert 0 < before.credits - after.credits < before.credits
        assert after.held == 0
    finally:
        await client.close()


@pytest.mark.parametrize("block", _of("python", run=False))
def test_fragment_is_part_of_a_block_that_runs(block: Block) -> None:
    assert block.not_run is not None
    assert block.not_run.startswith("part of"), "say what the fragment belongs to"
    runs = [
        other.code
        for other in BLOCKS
        if other.page == block.page and other.lang == "python" and other.not_run is None
    ]
    assert any(block.code in code for code in runs), f"{block.id} differs from what runs"


# --- shell -----------------------------------------------------------------------------------------


def _commands(code: str) -> Iterator[list[str]]:
    for line in code.splitlines():
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                command.append(word)
            elif command:
                yield command
                command = []


def _help(*argv: str) -> str:
    done = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} --help: {done.stderr}"
    return done.stdout


def _assert_options(options: list[str], usage: str, command: list[str]) -> None:
    for option in options:
        if option.startswith("-"):
            name = option.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", usage), (
                f"{' '.join(command)}: {name} is not an option"
            )


def _check_command(command: list[str]) -> None:
    program, args = Path(command[0]).name, command[1:]
    if program == "export":
        name, _, _ = args[0].partition("=")
        assert name.startswith("REDCREDIT_")
        assert name.removeprefix("REDCREDIT_").lower() in Settings.model_fields
    elif program == "redcredit":
        binary = str(Path(sys.executable).with_name("redcredit"))
        subcommand = args[0]
        assert re.search(rf"\b{subcommand}\b", _help(binary)), f"no subcommand {subcommand}"
        _assert_options(args[1:], _help(binary, subcommand), command)
    elif program in ("python", "python3"):
        assert args[0] == "-m", command
        module, rest = args[1], args[2:]
        if module == "venv":
            return
        if module == "pytest":
            for arg in rest:
                assert arg.startswith("-") or (ROOT / arg).exists(), f"{arg} does not exist"
            return
        _assert_options(rest, _help(sys.executable, "-m", module), command)
    elif program == "pip":
        assert args[0] == "install", command
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for arg in args[1:]:
            for extra in re.findall(r"\[([\w,-]+)\]", arg):
                assert set(extra.split(",")) <= set(extras), f"no extra {extra}"
    else:
        pytest.fail(f"{command}: teach this test what {program} is")


@pytest.mark.parametrize("block", _of("sh"))
def test_shell_block_names_what_exists(block: Block) -> None:
    commands = list(_commands(block.code))
    assert commands
    for command in commands:
        _check_command(command)


# --- SQL and JSON ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _of("sql"))
def test_sql_block_runs(block: Block, postgres_url: str, pg_schema: str) -> None:
    """The statement the library replaces does what the README says: one row, never below zero."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        schema = sql.Identifier(pg_schema)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        conn.execute(sql.SQL("SET search_path TO {}").format(schema))
        conn.execute("CREATE TABLE users (id text PRIMARY KEY, credits bigint NOT NULL)")
        conn.execute("INSERT INTO users VALUES ('user-42', 100)")
        conn.execute(sql.SQL("PREPARE spend AS {}").format(sql.SQL(block.code.strip())))
        assert conn.execute("EXECUTE spend(30, 'user-42')").fetchall() == [(70,)]
        assert conn.execute("EXECUTE spend(100, 'user-42')").fetchall() == []


@pytest.mark.parametrize("block", _of("json"))
def test_json_block_parses(block: Block) -> None:
    assert isinstance(json.loads(block.code), dict)
