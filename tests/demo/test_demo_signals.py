"""``redcredit demo`` ended by a signal, and printed on an 80-column terminal, as a user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from redcredit.demo.terminal import Table

# Where the binaries are stays; anything naming a server would keep the demo from starting its own.
_KEPT = ("REDCREDIT_REDIS_SERVER", "REDCREDIT_POSTGRES_BIN")


@pytest.fixture
def empty_tmpdir() -> Iterator[Path]:
    # Not tmp_path: under root, PostgreSQL's own user must be able to enter it.
    folder = Path(tempfile.mkdtemp(prefix="redcredit-demo-tmp-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("signum", "after"),
    [
        (signal.SIGTERM, "Stop with Ctrl-C."),
        (signal.SIGHUP, "Stop with Ctrl-C."),
        # While a child process holds a reservation, before anything is served.
        (signal.SIGTERM, "holding 15, in a child"),
    ],
    ids=["SIGTERM-serving", "SIGHUP-serving", "SIGTERM-playing"],
)
def test_a_signal_ends_the_demo_as_ctrl_c_does(
    signum: signal.Signals, after: str, empty_tmpdir: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_") or k in _KEPT}
    env.update(TMPDIR=str(empty_tmpdir), PYTHONUNBUFFERED="1", COLUMNS="80")
    demo = subprocess.Popen(
        [sys.executable, "-m", "redcredit.cli", "demo"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        while not lines or after not in lines[-1]:
            line = demo.stdout.readline()
            assert line, "the demo ended before printing " + after
            lines.append(line)
        assert any(entry.name.startswith("redcredit-postgres-") for entry in empty_tmpdir.iterdir())
        sent = time.monotonic()
        demo.send_signal(signum)
        out, err = demo.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    # The exit status of Ctrl-C, after closing everything on the way out.
    assert demo.returncode == 130, err[-3000:]
    assert took < 10, f"{took:.1f} s to stop"
    assert "Traceback" not in err, err[-3000:]
    assert "leaked" not in err, err[-3000:]
    assert sorted(entry.name for entry in empty_tmpdir.iterdir()) == []
    printed = "".join(lines) + out
    too_wide = [line for line in printed.splitlines() if len(line) > 80]
    assert too_wide == []


def _printed(capsys: pytest.CaptureFixture[str], table: Table, *rows: tuple[str, ...]) -> list[str]:
    for row in rows:
        table.add(*row)
    return capsys.readouterr().out.splitlines()


def test_a_table_wraps_its_wide_column_to_fit_80_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    table = Table(("call", "outcome", "credits", "held"), (70, 31, 9, 4), wrap=0)
    call = "grant(ada, 30, idempotency_key=pay)  # the same payment, twice"
    lines = _printed(capsys, table, (call, "granted, now 30 (replayed)", "30", "0"))
    assert max(len(line) for line in lines) <= 80
    assert len(lines) > 3  # the call went on over a further line
    first = lines[2].split()
    assert first[-2:] == ["30", "0"]  # the numbers stay on the row's first line
    width = table.widths[0]
    assert " ".join(line[:width] for line in lines[2:]).split() == call.split()


def test_a_wide_terminal_gets_one_line_a_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    table = Table(("call", "outcome", "credits", "held"), (70, 31, 9, 4), wrap=0)
    call = "grant(ada, 30, idempotency_key=pay)  # the same payment, twice"
    lines = _printed(capsys, table, (call, "granted, now 30 (replayed)", "30", "0"))
    assert len(lines) == 3
    assert lines[2].startswith(call) and lines[2].split()[-2:] == ["30", "0"]
