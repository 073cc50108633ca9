"""Every SQL statement of the package lives in redcredit/backends/postgres (module or package).

The migration files are SQL by nature and stay in backends/migrations/; every
other module reaches PostgreSQL through the named functions there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "redcredit"
HOME = PACKAGE / "backends"

# Statements as redcredit writes them: upper-case keywords. Prose in docstrings
# ("select the accounts from ...") is lower case and does not match.
_STATEMENT = re.compile(
    r"\bSELECT\b"
    r"|\bINSERT\s+INTO\b"
    r"|\bUPDATE\s+\S+\s+SET\b"
    r"|\bDELETE\s+FROM\b"
    r"|\b(?:CREATE|DROP|ALTER|TRUNCATE)\b(?:\s+[A-Z]+)*?\s+"
    r"(?:TABLE|SCHEMA|DATABASE|INDEX|VIEW|ROLE|FUNCTION|EXTENSION|SEQUENCE)\b"
    r"|\bCOPY\s+\S+.*\b(?:FROM|TO)\s+(?:STDIN|STDOUT)\b"
)


def _is_home(path: Path) -> bool:
    relative = path.relative_to(HOME).parts if path.is_relative_to(HOME) else ()
    return bool(relative) and (relative[0] == "postgres.py" or relative[0] == "postgres")


def sql_literals(path: Path) -> list[str]:
    """The string literals of a module (f-string parts too) that hold an SQL statement."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value[:60]!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and _STATEMENT.search(node.value)
    ]


def test_no_sql_outside_backends_postgres() -> None:
    scanned = [p for p in sorted(PACKAGE.rglob("*.py")) if not _is_home(p)]
    assert len(scanned) > 30  # the scan really walks the package
    stray = [hit for path in scanned for hit in sql_literals(path)]
    assert stray == [], "SQL outside redcredit/backends/postgres: move it there\n" + "\n".join(
        stray
    )


def test_the_scan_sees_the_statements_of_backends_postgres() -> None:
    # Without this, a pattern that matches nothing would let the test above pass.
    homes = [p for p in sorted(PACKAGE.rglob("*.py")) if _is_home(p)]
    found = "\n".join(hit for path in homes for hit in sql_literals(path))
    for statement in ("SELECT", "INSERT INTO", "DELETE FROM", "CREATE TEMP TABLE", "COPY"):
        assert statement in found, statement


def test_the_pattern_tells_statements_from_prose() -> None:
    statements = [
        "SELECT 1",
        "select-free SELECT pg_advisory_xact_lock(%s, %s)",
        "INSERT INTO {}.migrations (version, name) VALUES (%s, %s)",
        "UPDATE {}.accounts SET credits = 0",
        "DELETE FROM redcredit_incoming AS i",
        "CREATE TABLE IF NOT EXISTS {}.migrations (",
        "CREATE TEMP TABLE IF NOT EXISTS redcredit_incoming",
        "CREATE DATABASE {} OWNER postgres",
        "DROP SCHEMA {} CASCADE",
        "COPY redcredit_incoming ({}) FROM STDIN",
    ]
    prose = [
        "select the accounts from PostgreSQL",
        "deletes them from the stream once committed",
        "an update sets the balance",
        "create a table of your own",
        "SELECTED",
    ]
    assert [s for s in statements if not _STATEMENT.search(s)] == []
    assert [p for p in prose if _STATEMENT.search(p)] == []
