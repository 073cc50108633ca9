"""Writes clients/sync_client.py from clients/async_client.py, so the two clients cannot drift.

    python tools/async_to_sync.py          # rewrite sync_client.py
    python tools/async_to_sync.py --check  # exit 1 if sync_client.py is not up to date

The async client is the source. The transformation is plain text, in order;
every rule must apply at least once, so a change to async_client.py that a rule no
longer matches fails loudly instead of producing a half-converted file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "redcredit" / "clients" / "async_client.py"
TARGET = ROOT / "redcredit" / "clients" / "sync_client.py"

HEADER = (
    '"""The synchronous client: a thin driver of the engine\'s operations.\n\n'
    "Generated from ``async_client.py`` by ``tools/async_to_sync.py``: edit that file and\n"
    "run the tool; a test fails when the two differ.\n"
    '"""'
)

RULES: list[tuple[str, str]] = [
    (
        "import redis.asyncio\nimport redis.asyncio.cluster\n",
        "import redis\nimport redis.cluster\n",
    ),
    ("redis.asyncio.cluster.RedisCluster", "redis.cluster.RedisCluster"),
    ("redis.asyncio.Redis", "redis.Redis"),
    ("AsyncReservationBlock", "ReservationBlock"),
    ("AsyncRedCredit", "RedCredit"),
    ("AsyncAccountLoader", "AccountLoader"),
    ("AsyncDefaultsLoader", "DefaultsLoader"),
    ("AsyncPostgresLoader", "PostgresLoader"),
    ("AsyncTopology", "Topology"),
    ("concurrent ones pipelined\n        # per node", "one round trip\n        # per call"),
    ("async def __aenter__", "def __enter__"),
    ("async def __aexit__", "def __exit__"),
    ("await self.close()", "self.close()"),
    ("from asyncio code", "from synchronous code"),
    ("An ``async with`` block", "A ``with`` block"),
    ("async def ", "def "),
    ("await ", ""),
]


def convert(source: str) -> str:
    end = source.index('"""', 3) + 3
    text = source[end:]
    for old, new in RULES:
        if old not in text:
            raise SystemExit(f"rule no longer applies to async_client.py: {old!r}")
        text = text.replace(old, new)
    text = HEADER + text
    # Renames can reorder imports and shorten lines: let ruff settle both.
    text = _ruff(text, "check", "--fix", "--select", "I", "--quiet", "--exit-zero")
    return _ruff(text, "format")


def _ruff(text: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    generated = convert(SOURCE.read_text())
    if args.check:
        if TARGET.read_text() != generated:
            print("redcredit/clients/sync_client.py is out of date: run tools/async_to_sync.py")
            return 1
        return 0
    TARGET.write_text(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
