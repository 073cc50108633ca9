"""``python -m tests.properties.sim [--cluster] [--seed N] [--duration S] [--workers W] [--accounts A]``."""

from __future__ import annotations

import argparse
import random
import sys

from tests.properties.sim.run import simulate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.properties.sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults")
    parser.add_argument("--workers", type=int, default=48)
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument(
        "--cluster", action="store_true", help="on a Redis Cluster: 3 primaries, 3 replicas"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    report = simulate(
        seed, args.duration, workers=args.workers, accounts=args.accounts, cluster=args.cluster
    )
    print(report.text())
    print("\n".join(["fault schedule:", *report.fault_log]))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
