"""The demo's terminal: tables that fit its width, and the signals that end the demo."""

from __future__ import annotations

import contextlib
import shutil
import signal
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["TERMINATING", "Table", "handling", "interrupt"]

# Both end a process without running any Python by default: the embedded
# servers die with it (the kernel sees to that), but their data folders stay.
TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)

# Narrower than this, a wrapped column is harder to read than a wrapped line.
_NARROWEST = 12


class Table:
    """Rows printed as they happen, so a slow step (waiting for a lease) shows progress.

    The ``wrap`` column gives up what the terminal lacks: its cells continue on
    further lines, so that every line fits (the default 80 columns when the
    output is not a terminal).
    """

    def __init__(
        self, headers: tuple[str, ...], widths: tuple[int, ...], *, wrap: int | None = None
    ) -> None:
        self.widths = list(widths)
        self.wrap = wrap
        if wrap is not None:
            others = sum(widths) - widths[wrap] + 2 * (len(widths) - 1)
            room = shutil.get_terminal_size().columns - others
            self.widths[wrap] = max(min(widths[wrap], room), _NARROWEST)
        self._print(headers)
        self._print(tuple("-" * width for width in self.widths))

    def add(self, *cells: object) -> None:
        self._print(tuple(str(cell) for cell in cells))

    def _print(self, row: tuple[str, ...]) -> None:
        columns = [[cell] for cell in row]
        if self.wrap is not None:
            width = self.widths[self.wrap]
            wrapped = textwrap.wrap(row[self.wrap], width, subsequent_indent="  ")
            columns[self.wrap] = wrapped or [""]
        for i in range(max(len(lines) for lines in columns)):
            cells = (lines[i] if i < len(lines) else "" for lines in columns)
            line = "  ".join(cell.ljust(w) for cell, w in zip(cells, self.widths, strict=True))
            print(line.rstrip(), flush=True)


Handler = Callable[[int, FrameType | None], Any]


def interrupt(signum: int, frame: FrameType | None) -> None:
    """Ends the demo as Ctrl-C does: every ``with`` and ``finally`` on the way out runs."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def handling(signals: Iterable[int], handler: Handler) -> Iterator[None]:
    """The handler for the signals while the block runs, then the previous ones again.

    A signal that was ignored (``nohup``) stays ignored, and outside the main
    thread, where Python takes no signals, nothing changes.
    """
    previous: dict[int, Handler | int] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                old = signal.signal(signum, handler)
                # None is a handler installed from C, which Python cannot put back.
                previous[signum] = signal.SIG_DFL if old is None else old
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
