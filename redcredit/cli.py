"""The ``redcredit`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .errors import RedCreditError

__all__ = ["main"]


def _demo(_args: argparse.Namespace) -> int:
    # Imported late: keeps `redcredit --help` fast.
    from .demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redcredit",
        description="Credits, chat-message quotas and reservations for LLM products.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="play a short scenario on Redis (embedded unless REDCREDIT_REDIS_URL is set)"
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except RedCreditError as exc:
        print(f"redcredit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
